//! REST request bodies, read as the handlers read them (JSON, then the
//! schema and its validators), then validated further as the chat layer
//! does: message bodies, idempotency keys, room names and member ids.
#![no_main]

use chat_service::{
    api::types::{CreateRoom, SendMessage, parse_body},
    domain::{ClientId, MAX_NAME_CHARS, MessageBody, RoomId, UserId, clean_name},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(send) = parse_body::<SendMessage>(data) {
        let _ = MessageBody::parse(&send.body.0, 2000);
        if let Some(id) = &send.client_id {
            let _ = ClientId::parse(&id.0);
        }
    }
    if let Ok(room) = parse_body::<CreateRoom>(data) {
        let name = clean_name(&room.name.0, 100);
        assert!(name.chars().count() <= 100);
        assert!(!name.chars().any(char::is_control));
        if let Some(id) = &room.id {
            // The schema's pattern and the domain's parser agree.
            assert!(
                RoomId::parse(&id.0).is_ok(),
                "schema accepted room id {:?}",
                id.0
            );
        }
        for member in room.members.iter().flatten() {
            assert!(
                UserId::parse(&member.0).is_ok(),
                "schema accepted user id {:?}",
                member.0
            );
        }
    }
    let _ = clean_name(&String::from_utf8_lossy(data), MAX_NAME_CHARS);
});
