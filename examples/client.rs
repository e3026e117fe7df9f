//! A terminal chat client, for trying the service by hand.
//!
//! ```text
//! cargo run --example client -- ws://127.0.0.1:8001/ws/chat/global "$TOKEN"
//! ```
//!
//! Each line typed is sent as a message (`/typing` sends a typing notice,
//! `/ping` a ping); every frame the server sends is printed as it arrives.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: client <ws://host:port/ws/chat/ROOM> <TOKEN>");
    };
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let (socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow::bail!("refused: {} {body}", response.status());
        }
        Err(other) => return Err(other.into()),
    };
    let (mut write, mut read) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut sent = 0u64;
    loop {
        tokio::select! {
            frame = read.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("< {text}"),
                Some(Ok(Message::Close(frame))) => {
                    println!("closed: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => anyhow::bail!("connection lost: {err}"),
                None => return Ok(()),
            },
            line = lines.next_line() => {
                let Some(line) = line? else { return Ok(()) };
                let frame = match line.trim() {
                    "" => continue,
                    "/typing" => json!({"type": "typing"}),
                    "/ping" => json!({"type": "ping"}),
                    body => {
                        sent += 1;
                        json!({"type": "message", "body": body, "client_id": format!("cli-{}-{sent}", std::process::id())})
                    }
                };
                write.send(Message::text(frame.to_string())).await?;
            }
        }
    }
}
