//! Query strings and path parameters: the WebSocket handshake's `token` and
//! `since`, and the ids every route takes (room ids with their `dm:` shape,
//! user ids, idempotency keys). The input is a query string; its first
//! `&`-separated piece is also read as an id.
#![no_main]

use chat_service::{
    domain::{ClientId, IdShape, RoomId, UserId},
    ws::parse_query,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(uri) = poem::http::Uri::try_from(format!("/ws/chat/global?{text}")) {
        let request = poem::Request::builder().uri(uri).finish();
        let _ = parse_query(&request);
    }
    let piece = text.split('&').next().unwrap_or_default();
    if let Ok(room) = RoomId::parse(piece) {
        assert!(room.as_str().len() <= RoomId::MAX_LEN);
        if let Ok(IdShape::Direct(a, b)) = room.shape() {
            assert!(a.as_str() < b.as_str());
            assert_eq!(RoomId::direct(&a, &b).ok().as_ref(), Some(&room));
        }
    }
    if let Ok(user) = UserId::parse(piece) {
        assert!(!user.as_str().is_empty() && user.as_str().len() <= UserId::MAX_LEN);
    }
    let _ = ClientId::parse(piece);
});
