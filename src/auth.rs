//! Authentication: verifying the Core service's JWTs, and minting local ones.
//!
//! Only the configured HMAC algorithm is accepted (a token whose header names
//! any other algorithm, `none` included, is refused before its signature is
//! looked at). `exp` and `sub` are required; `nbf` and `iat` are checked when
//! present; `iss` and `aud` when configured. Error messages say what was wrong
//! with a token but never repeat it.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    config::{JwtAlgorithm, Secret, ServeConfig},
    domain::{Caller, MAX_NAME_CHARS, Role, User, UserId, clean_name},
    error::ChatError,
};

/// Tokens longer than this are refused unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Clone)]
pub struct JwtKeys {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    leeway: Duration,
}

/// The claims read from a token. `sub` may be a string or a number.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    name: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    exp: i64,
    iat: Option<i64>,
}

/// The claims written by [`JwtKeys::mint`].
#[derive(Debug, Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    roles: &'a [String],
    iat: i64,
    exp: i64,
}

impl JwtKeys {
    pub fn new(secret: &Secret, config: &ServeConfig) -> Self {
        let algorithm = match config.jwt_algorithm {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Hs384 => Algorithm::HS384,
            JwtAlgorithm::Hs512 => Algorithm::HS512,
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &config.jwt_issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Self {
            algorithm,
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            leeway: config.jwt_leeway,
        }
    }

    /// How long after `exp` a connection may stay open.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Caller, ChatError> {
        let unauthorized = |why: &str| ChatError::Unauthorized(why.to_owned());
        if token.is_empty() {
            return Err(unauthorized("empty token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(unauthorized("token too large"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unauthorized("malformed token"))?;
        if header.alg != self.algorithm {
            return Err(unauthorized(
                "token signed with an algorithm that is not accepted",
            ));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|err| {
                use jsonwebtoken::errors::ErrorKind as K;
                unauthorized(match err.kind() {
                    K::ExpiredSignature => "token expired",
                    K::ImmatureSignature => "token not valid yet",
                    K::InvalidSignature => "invalid token signature",
                    K::InvalidIssuer => "invalid token issuer",
                    K::InvalidAudience => "invalid token audience",
                    K::MissingRequiredClaim(_) => "token lacks a required claim",
                    _ => "invalid token",
                })
            })?;
        let claims = data.claims;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if claims
            .iat
            .is_some_and(|iat| iat > now + self.leeway.as_secs() as i64)
        {
            return Err(unauthorized("token issued in the future"));
        }
        let sub = match claims.sub {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err(unauthorized("token subject must be a string or a number")),
            None => return Err(unauthorized("token lacks a required claim")),
        };
        let id = UserId::parse(&sub)
            .map_err(|_| unauthorized("token subject is not a valid user id"))?;
        let name = claims
            .name
            .map(|n| clean_name(&n, MAX_NAME_CHARS))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| id.to_string());
        let mut roles: Vec<Role> = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        roles.dedup();
        let expires_at = OffsetDateTime::from_unix_timestamp(claims.exp)
            .map_err(|_| unauthorized("token expiry out of range"))?;
        Ok(Caller {
            user: User { id, name },
            roles,
            expires_at,
        })
    }

    /// Mints a token (the `token` command and tests).
    pub fn mint(
        &self,
        sub: &str,
        name: Option<&str>,
        roles: &[String],
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = MintClaims {
            sub,
            name,
            roles,
            iat: now,
            exp: now + ttl.as_secs() as i64,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(self.algorithm),
            &claims,
            &self.encoding,
        )?)
    }
}

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Subprotocol,
    Query,
}

/// The subprotocol a browser offers alongside its token.
pub const SUBPROTOCOL: &str = "chat.v1";
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Finds the token in the contract's order: `Authorization: Bearer`, then
/// `Sec-WebSocket-Protocol: chat.v1, bearer.<jwt>`, then `?token=`. The first
/// source present is the one used, valid or not.
pub fn find_token<'a>(
    authorization: Option<&'a str>,
    subprotocols: Option<&'a str>,
    query_token: Option<&'a str>,
) -> Option<(TokenSource, &'a str)> {
    if let Some(value) = authorization {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or("");
        return Some((TokenSource::Header, token.trim()));
    }
    if let Some(token) = subprotocols.and_then(|list| {
        list.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
    }) {
        return Some((TokenSource::Subprotocol, token));
    }
    query_token.map(|t| (TokenSource::Query, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &str) -> JwtKeys {
        JwtKeys::new(
            &Secret::new(secret),
            &ServeConfig::for_tests("sqlite::memory:", secret),
        )
    }

    #[test]
    fn minted_tokens_verify() {
        let k = keys("s3cret");
        let token = k
            .mint(
                "42",
                Some("alice"),
                &["admin".into(), "bogus".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        let caller = k.verify(&token).unwrap();
        assert_eq!(caller.id().as_str(), "42");
        assert_eq!(caller.user.name, "alice");
        assert_eq!(caller.roles, vec![Role::Admin]);
    }

    #[test]
    fn other_secrets_and_algorithms_are_refused() {
        let token = keys("one")
            .mint("42", None, &[], Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            keys("two").verify(&token),
            Err(ChatError::Unauthorized(_))
        ));

        let mut config = ServeConfig::for_tests("sqlite::memory:", "one");
        config.jwt_algorithm = JwtAlgorithm::Hs512;
        let hs512 = JwtKeys::new(&Secret::new("one"), &config);
        assert!(
            hs512.verify(&token).is_err(),
            "HS256 token accepted by an HS512 service"
        );

        // alg: none, unsigned.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"42","exp":9999999999}"#)
        );
        assert!(keys("one").verify(&none).is_err());
    }

    /// From the fuzz target `jwt`: refusals are short fixed texts. (Its
    /// first finding was its own oracle's: "malformed to" is a token that is
    /// also a word of the message "malformed token".)
    #[test]
    fn refusals_are_short_fixed_texts_that_never_repeat_the_token() {
        let k = keys("s");
        let long = format!("{}.{}.{}", "a".repeat(40), "b".repeat(40), "c".repeat(40));
        for token in ["Bearer malformed to", "malformed to", "x", long.as_str()] {
            let Err(ChatError::Unauthorized(message)) = k.verify(token) else {
                panic!("{token:?} accepted");
            };
            assert!(message.len() <= 64, "{message:?}");
            assert!(token.len() < 20 || !message.contains(token), "{message:?}");
        }
    }

    #[test]
    fn numeric_subjects_become_strings() {
        let k = keys("s");
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": 42, "exp": 9_999_999_999i64}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(k.verify(&token).unwrap().id().as_str(), "42");
        let no_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"exp": 9_999_999_999i64}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(k.verify(&no_sub).is_err());
    }

    #[test]
    fn first_present_source_wins() {
        assert_eq!(
            find_token(Some("Bearer abc"), Some("chat.v1, bearer.def"), Some("ghi")),
            Some((TokenSource::Header, "abc"))
        );
        assert_eq!(
            find_token(None, Some("chat.v1, bearer.def"), Some("ghi")),
            Some((TokenSource::Subprotocol, "def"))
        );
        assert_eq!(
            find_token(None, Some("chat.v1"), Some("ghi")),
            Some((TokenSource::Query, "ghi"))
        );
        assert_eq!(
            find_token(Some("Basic x"), None, Some("ghi")),
            Some((TokenSource::Header, ""))
        );
        assert_eq!(find_token(None, None, None), None);
    }

    fn b64(s: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
