//! Tokens: where they are found (`find_token` over the three transports)
//! and `JwtKeys::verify` with a fixed secret. The input is split on NUL
//! bytes into an `Authorization` value, a `Sec-WebSocket-Protocol` value
//! and a `?token=`; a single part is verified as a token directly.
#![no_main]

use std::sync::OnceLock;

use chat_service::{
    auth::{JwtKeys, find_token},
    config::{Secret, ServeConfig},
};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzzing-secret-of-reasonable-length";

fn keys() -> &'static JwtKeys {
    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        JwtKeys::new(
            &Secret::new(SECRET),
            &ServeConfig::for_tests("sqlite::memory:", SECRET),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let first = parts.next().unwrap_or_default();
    let (second, third) = (parts.next(), parts.next());
    let token = if second.is_none() {
        Some(first)
    } else {
        find_token(Some(first).filter(|s| !s.is_empty()), second, third).map(|(_, t)| t)
    };
    if let Some(token) = token {
        match keys().verify(token) {
            // Only a token signed with the secret gets here, and the fuzzer
            // does not know it: an accepted token would be a forgery.
            Ok(caller) => panic!("forged token accepted for {}", caller.id()),
            Err(err) => {
                // Messages are short fixed texts: never an echo of the token
                // (a short token may of course be a word of one of them).
                let message = err.client_message();
                assert!(message.len() <= 64, "{message:?}");
            }
        }
    }
});
