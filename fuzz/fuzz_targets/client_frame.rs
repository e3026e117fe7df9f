//! A client's WebSocket text frame: `ClientFrame::parse`, then what the
//! session does next with a message (body normalisation) or an error
//! (serialising the error frame that echoes the `client_id`).
#![no_main]

use chat_service::{
    domain::MessageBody,
    protocol::{ClientFrame, ServerFrame},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // tungstenite refuses non-UTF-8 text frames before the service sees them.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientFrame::parse(text) {
        Ok(ClientFrame::Message { body, client_id }) => {
            if let Ok(body) = MessageBody::parse(&body, 2000) {
                let normalised = body.as_str();
                assert!(!normalised.is_empty());
                assert_eq!(normalised, normalised.trim());
                assert!(!normalised.contains('\r'));
            }
            if let Some(id) = client_id {
                assert!((1..=64).contains(&id.as_str().chars().count()));
            }
        }
        Ok(_) => {}
        Err(bad) => {
            let message = bad.error.client_message();
            let frame =
                ServerFrame::error(bad.error.code(), &message, None, bad.client_id.as_deref());
            let json = frame.to_json();
            assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
        }
    }
});
