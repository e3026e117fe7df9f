//! The generator's WebSocket client, for every connection it opens.
//!
//! Members and idle connections make nearly all of the generator's frames
//! (at 100,000 deliveries/s, one frame per delivery), so they read them
//! without tungstenite: one buffer per connection, filled by plain reads and
//! never zeroed again, frames parsed in place, text payloads handed out as
//! borrowed bytes. A member looks only for the send time a benchmark body
//! carries ([`delivery_stamp`]), with two substring searches instead of
//! parsing the frame's JSON. Pings are answered and a close ends the
//! connection.
//!
//! Senders use the same client: each text frame is masked into one buffer
//! the connection keeps, several frames queued at once leave in one write,
//! and a reply is told apart by its `type` alone ([`reply`]).
//!
//! Measured with `perf` at 2,000 msg/s into rooms of 50 (100,000
//! deliveries/s): tungstenite's framing, its per-message buffers and the
//! JSON parse were about 12 % of the generator's samples, and its wakers
//! another 3 %. Durable ingest (one reply per send) measured the same of
//! the senders: docs/benchmarks.md, twentieth VM.

use std::{io, sync::LazyLock};

use anyhow::Context;
use memchr::memmem::Finder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::arrival::Stamped;

/// Bytes asked of the socket per read: many small frames at once.
const READ_CHUNK: usize = 8192;

/// The largest frame accepted: a `ready` frame lists the room's presence,
/// 1,000 members in a hot room, far below this.
const MAX_FRAME: usize = 16 << 20;

/// The largest response head accepted during the handshake.
const MAX_HEAD: usize = 16 << 10;

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

/// RFC 6455's code for a close frame that carried no status code.
const NO_STATUS: u16 = 1005;

/// A WebSocket client connection.
pub struct Member<S> {
    stream: S,
    /// Always initialised up to its length: read into from `end`, consumed
    /// from `start`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Frames queued to be written ([`Member::queue_text`]); empty, and
    /// without an allocation, on a connection that never sends.
    out: Vec<u8>,
    /// The status code of the server's close frame, once it sent one
    /// (1005 when it carried none).
    closed_with: Option<u16>,
    /// When the last read that brought bytes returned (µs since the epoch).
    read_us: u64,
}

/// What a sender makes of a server frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ack,
    Error,
    /// Anything else: the room's traffic, presence.
    Other,
}

/// The kind of reply `frame` is, by its `type` (the first key of every
/// server frame; inside a JSON string its quotes would be escaped, so a
/// body cannot fake it).
pub fn reply(frame: &[u8]) -> Reply {
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""type":""#));
    let Some(at) = TYPE.find(frame) else {
        return Reply::Other;
    };
    let value = &frame[at + TYPE.needle().len()..];
    if value.starts_with(br#"ack""#) {
        Reply::Ack
    } else if value.starts_with(br#"error""#) {
        Reply::Error
    } else {
        Reply::Other
    }
}

/// One complete frame found in the buffer, by position.
struct FrameAt {
    opcode: u8,
    payload: std::ops::Range<usize>,
}

impl Member<Stamped> {
    /// Connects to `url` (`http://host:port`) and opens the WebSocket at
    /// `path_and_query`, Nagle off as a real client would have it, with
    /// the arrival of what it reads stamped if `stamped` ([`Stamped`]).
    pub async fn connect(url: &str, path_and_query: &str, stamped: bool) -> anyhow::Result<Self> {
        let host = url
            .strip_prefix("http://")
            .with_context(|| format!("chat-bench's members speak plain ws://, not {url}"))?
            .trim_end_matches('/');
        let stream = Stamped::connect(host, stamped).await?;
        Self::handshake(stream, host, path_and_query).await
    }

    /// When the frame [`Member::next_text`] last returned reached the
    /// socket (if stamped): it was completed by the newest read, since the
    /// buffer is read into only when it holds no complete frame.
    pub fn arrived_us(&self) -> Option<u64> {
        self.stream.arrived_us()
    }
}

impl<S> Member<S> {
    /// When the frame [`Self::next_text`] returned last was read: the
    /// return of the read that completed it (µs since the epoch). Every
    /// frame of one read shares it, so a member reads the clock once per
    /// read, not once per frame (at 500,000 deliveries/s in reads of seven
    /// frames, two clock reads per frame were 6 % of the generator's
    /// samples).
    pub fn read_us(&self) -> u64 {
        self.read_us
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Member<S> {
    /// Sends the upgrade request and reads the response; bytes after the
    /// response head (the server's first frames) stay in the buffer.
    pub async fn handshake(
        mut stream: S,
        host: &str,
        path_and_query: &str,
    ) -> anyhow::Result<Self> {
        let key = generate_key();
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut member = Self {
            stream,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            out: Vec::new(),
            closed_with: None,
            read_us: 0,
        };
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&member.buf[..member.end], b"\r\n\r\n") {
                break at + 4;
            }
            anyhow::ensure!(
                member.end < MAX_HEAD,
                "the upgrade response's head is too long"
            );
            anyhow::ensure!(member.fill().await? > 0, "closed during the upgrade");
        };
        let head = std::str::from_utf8(&member.buf[..head_end])?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        anyhow::ensure!(
            status.starts_with("HTTP/1.1 101"),
            "the upgrade was refused: {status}"
        );
        let accept = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, value)| value.trim());
        anyhow::ensure!(
            accept == Some(derive_accept_key(key.as_bytes()).as_str()),
            "the upgrade response's Sec-WebSocket-Accept does not match the key"
        );
        member.start = head_end;
        Ok(member)
    }

    /// The next text frame's payload; `None` once the server closed the
    /// connection (with a close frame or not). Pings are answered on the
    /// way; binary frames and pongs are skipped.
    ///
    /// Cancel-safe: what was read is kept in the buffer, and a pong cut
    /// short is finished by the next flush ([`Member::flush`]).
    pub async fn next_text(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            let Some(frame) = self.parse()? else {
                if self.fill().await? == 0 {
                    return Ok(None);
                }
                continue;
            };
            self.start = frame.payload.end;
            match frame.opcode {
                OPCODE_TEXT => return Ok(Some(&self.buf[frame.payload])),
                OPCODE_PING => {
                    let payload = self.buf[frame.payload].to_vec();
                    self.send_control(OPCODE_PONG, &payload).await?;
                }
                OPCODE_CLOSE => {
                    // Echo the status code, as the closing handshake asks.
                    let code = self.buf[frame.payload]
                        .get(..2)
                        .unwrap_or_default()
                        .to_vec();
                    self.closed_with = Some(match *code {
                        [high, low] => u16::from_be_bytes([high, low]),
                        _ => NO_STATUS,
                    });
                    let _ = self.send_control(OPCODE_CLOSE, &code).await;
                    return Ok(None);
                }
                _ => {} // binary, pong
            }
        }
    }

    /// The status code of the server's close frame, if it closed the
    /// connection with one (1005 for a close frame without a code).
    pub fn closed_with(&self) -> Option<u16> {
        self.closed_with
    }

    /// Whether the next [`Member::next_text`] returns without reading: a
    /// whole text frame is buffered (or a close, or a malformed frame to
    /// fail on), behind nothing but frames it answers or skips on the way.
    ///
    /// Not merely whether some frame is buffered: a ping that came behind
    /// the last answer a sender waits for would have it read on, for a
    /// text that only its next send brings — a sender stalled for good,
    /// answering the server's pings.
    pub fn text_buffered(&self) -> bool {
        let mut at = self.start;
        loop {
            match self.parse_at(at) {
                Ok(Some(frame)) if matches!(frame.opcode, OPCODE_TEXT | OPCODE_CLOSE) => {
                    return true;
                }
                // A ping, pong or binary frame: `next_text` goes past it.
                Ok(Some(frame)) => at = frame.payload.end,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    /// The complete frame at the front of the buffer, if there is one.
    fn parse(&self) -> io::Result<Option<FrameAt>> {
        self.parse_at(self.start)
    }

    /// The complete frame buffered from `start` on, if there is one.
    fn parse_at(&self, start: usize) -> io::Result<Option<FrameAt>> {
        let bytes = &self.buf[start..self.end];
        let [first, second, ..] = *bytes else {
            return Ok(None);
        };
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0F);
        if first & 0x70 != 0 || !fin || opcode == 0 {
            // No extension is negotiated, and the server writes each
            // message as one frame.
            return Err(invalid("a reserved bit, or a fragmented message"));
        }
        if second & 0x80 != 0 {
            return Err(invalid("a masked frame from the server"));
        }
        let (header, len) = match second & 0x7F {
            126 if bytes.len() >= 4 => (4, u16::from_be_bytes([bytes[2], bytes[3]]) as u64),
            127 if bytes.len() >= 10 => (
                10,
                u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")),
            ),
            126 | 127 => return Ok(None),
            len => (2, u64::from(len)),
        };
        if opcode & 0x8 != 0 && len > 125 {
            // A ping's payload goes back in the pong.
            return Err(invalid("a control frame longer than 125 bytes"));
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= MAX_FRAME)
            .ok_or_else(|| invalid("a frame larger than chat-bench accepts"))?;
        if bytes.len() < header + len {
            return Ok(None);
        }
        let payload = start + header;
        Ok(Some(FrameAt {
            opcode,
            payload: payload..payload + len,
        }))
    }

    /// Reads once into the buffer, making room first: consumed bytes are
    /// dropped and, for a frame larger than the buffer, the buffer grows.
    /// Returns the bytes read (0: end of stream).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            // A large frame's buffer is not kept for the connection's life.
            if self.buf.len() > READ_CHUNK {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
        if self.buf.len() - self.end < READ_CHUNK / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            let wanted = self.end + READ_CHUNK;
            if self.buf.len() < wanted {
                self.buf.resize(wanted, 0);
            }
        }
        let read = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += read;
        if read > 0 {
            self.read_us = crate::unix_micros();
        }
        Ok(read)
    }

    /// Queues `payload` as one text frame, written by the next
    /// [`Member::flush`].
    pub fn queue_text(&mut self, payload: &[u8]) {
        encode(&mut self.out, OPCODE_TEXT, payload);
    }

    /// Writes the queued frames, in one write when the socket takes them.
    /// Cancel-safe: what the socket took is dropped from the queue as it
    /// goes, so a flush cut short (a pong's, inside a cancelled
    /// [`Member::next_text`]) leaves only the rest for the next one, never
    /// a frame's first bytes twice. A failed write drops the queue.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out).await {
                Ok(written) if written > 0 => {
                    self.out.drain(..written);
                }
                failed => {
                    self.out.clear();
                    return Err(failed.err().unwrap_or(io::ErrorKind::WriteZero.into()));
                }
            }
        }
        Ok(())
    }

    /// Writes `payload` as one text frame.
    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        self.queue_text(payload);
        self.flush().await
    }

    /// Writes a control frame, after anything queued.
    async fn send_control(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        debug_assert!(payload.len() <= 125, "control frames are short");
        encode(&mut self.out, opcode, payload);
        self.flush().await
    }
}

/// Appends one masked frame (a client's frames are masked) to `out`.
fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_head(out, opcode, payload.len(), MASKED);
    let mask = mask_key();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// The mask bit of a frame's second byte.
const MASKED: u8 = 0x80;

/// Appends the head of a final frame of `len` payload bytes: its opcode,
/// `mask_bit` (0 or [`MASKED`]) and the length in the shortest encoding.
fn push_head(out: &mut Vec<u8>, opcode: u8, len: usize, mask_bit: u8) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server sent {what}"),
    )
}

/// A fresh masking key. Masking guards intermediaries' caches against
/// script-written frames; a load generator talking straight to the server
/// needs a fresh key per frame, not an unpredictable one.
fn mask_key() -> [u8; 4] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos.wrapping_mul(0x9E37_79B9).to_le_bytes()
}

/// The send time (µs since the epoch) and phase a benchmark message's body
/// carries (`t:<send time>:<phase>`), when `frame` is a `message` frame
/// with such a body. Neither key can appear in the frame other than as a
/// key: inside a JSON string its quotes would be escaped.
pub fn delivery_stamp(frame: &[u8]) -> Option<(u64, u64)> {
    static MESSAGE: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(br#""type":"message""#));
    static STAMP: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""body":"t:"#));
    MESSAGE.find(frame)?;
    let rest = &frame[STAMP.find(frame)? + STAMP.needle().len()..];
    let (sent, rest) = digits_until(rest, b':')?;
    let (phase, _) = digits_until(rest, b'"')?;
    Some((sent, phase))
}

/// The decimal number at the start of `bytes`, ended by `end`, and what
/// follows `end`.
fn digits_until(bytes: &[u8], end: u8) -> Option<(u64, &[u8])> {
    let at = memchr::memchr(end, bytes)?;
    let number = std::str::from_utf8(&bytes[..at]).ok()?.parse().ok()?;
    Some((number, &bytes[at + 1..]))
}

/// A server's side of a member's connection, for tests (the member's own and
/// the ingest loop's in `main.rs`).
#[cfg(test)]
pub mod testing {
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    use super::*;

    /// A server frame as the server writes it: unmasked, one frame.
    pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_head(&mut out, opcode, payload.len(), 0);
        out.extend_from_slice(payload);
        out
    }

    /// A server's text frame.
    pub fn text(payload: &[u8]) -> Vec<u8> {
        frame(OPCODE_TEXT, payload)
    }

    /// A server's close frame with status `code`.
    pub fn close(code: u16) -> Vec<u8> {
        frame(OPCODE_CLOSE, &code.to_be_bytes())
    }

    /// Plays the server's side of the handshake on `server`, answering with
    /// `accept` (the right key when `None`), followed by `then`.
    pub async fn serve_upgrade(
        server: DuplexStream,
        accept: Option<&str>,
        then: &[u8],
    ) -> DuplexStream {
        let mut server = BufReader::new(server);
        let mut key = String::new();
        loop {
            let mut line = String::new();
            server.read_line(&mut line).await.unwrap();
            if let Some(value) = line.strip_prefix("Sec-WebSocket-Key: ") {
                key = value.trim().to_owned();
            }
            if line == "\r\n" {
                break;
            }
        }
        let accept = accept.map_or_else(|| derive_accept_key(key.as_bytes()), str::to_owned);
        let mut response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        response.extend_from_slice(then);
        server.get_mut().write_all(&response).await.unwrap();
        server.into_inner()
    }

    pub async fn connected(then: &[u8]) -> (Member<DuplexStream>, DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (member, server) = tokio::join!(
            Member::handshake(client, "127.0.0.1:1", "/ws/chat/r?token=x"),
            serve_upgrade(server, None, then),
        );
        (member.unwrap(), server)
    }

    /// Reads a masked client frame and returns its opcode and unmasked
    /// payload.
    pub async fn read_client_frame(server: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0; 2];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let len = match head[1] & 0x7F {
            126 => usize::from(server.read_u16().await.unwrap()),
            127 => usize::try_from(server.read_u64().await.unwrap()).unwrap(),
            len => usize::from(len),
        };
        let mut mask = [0; 4];
        server.read_exact(&mut mask).await.unwrap();
        let mut payload = vec![0; len];
        server.read_exact(&mut payload).await.unwrap();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        (head[0] & 0x0F, payload)
    }
}

#[cfg(test)]
mod tests {
    use chat_service::{
        bus::{WireMessage, WireUser},
        protocol::ServerFrame,
    };

    use super::{testing::*, *};

    /// The frames that came in the same read as the upgrade response are
    /// not lost: the first one is the server's `ready`.
    #[tokio::test]
    async fn frames_sent_with_the_upgrade_response_are_read() {
        let mut then = text(br#"{"type":"ready"}"#);
        then.extend(text(b"second"));
        let (mut member, _server) = connected(&then).await;
        assert_eq!(
            member.next_text().await.unwrap(),
            Some(&br#"{"type":"ready"}"#[..])
        );
        assert_eq!(member.next_text().await.unwrap(), Some(&b"second"[..]));
    }

    /// The frames of one read carry that read's time, however much later
    /// they are taken; a frame from a later read carries the later time.
    #[tokio::test]
    async fn frames_of_one_read_carry_its_time() {
        let mut then = text(b"one");
        then.extend(text(b"two"));
        let (mut member, mut server) = connected(&then).await;
        assert_eq!(member.next_text().await.unwrap(), Some(&b"one"[..]));
        let first = member.read_us();
        assert!(first > 0, "a read was timed");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        assert_eq!(member.next_text().await.unwrap(), Some(&b"two"[..]));
        assert_eq!(member.read_us(), first, "taken later, read together");
        server.write_all(&text(b"three")).await.unwrap();
        assert_eq!(member.next_text().await.unwrap(), Some(&b"three"[..]));
        assert!(member.read_us() >= first + 2_000, "read 2 ms later or more");
    }

    /// A text frame counts as buffered only once all of it has been read.
    #[tokio::test]
    async fn a_text_is_buffered_once_whole() {
        let mut then = text(b"first");
        then.extend(text(b"second"));
        let (mut member, mut server) = connected(&then).await;
        assert!(member.text_buffered());
        assert_eq!(member.next_text().await.unwrap(), Some(&b"first"[..]));
        assert!(member.text_buffered());
        assert_eq!(member.next_text().await.unwrap(), Some(&b"second"[..]));
        assert!(!member.text_buffered(), "nothing left");
        let third = text(b"third");
        server.write_all(&third[..3]).await.unwrap();
        member.fill().await.unwrap();
        assert!(!member.text_buffered(), "a part of a frame");
        server.write_all(&third[3..]).await.unwrap();
        member.fill().await.unwrap();
        assert!(member.text_buffered());
        assert_eq!(member.next_text().await.unwrap(), Some(&b"third"[..]));
    }

    /// A ping (or a binary frame) behind the last answer is no text to wait
    /// for (a sender that read on for one would wait for ever); a ping in
    /// front of a text is answered on the way to it, and a close ends the
    /// wait at once.
    #[tokio::test]
    async fn control_frames_alone_are_no_text_buffered() {
        const OPCODE_BINARY: u8 = 0x2;
        let mut then = text(b"ack");
        then.extend(frame(OPCODE_PING, b"p1"));
        then.extend(frame(OPCODE_BINARY, b"skipped"));
        let (mut member, mut server) = connected(&then).await;
        assert_eq!(member.next_text().await.unwrap(), Some(&b"ack"[..]));
        assert!(!member.text_buffered(), "only a ping and a binary frame");

        let mut more = frame(OPCODE_PING, b"p2");
        more.extend(text(b"copy"));
        more.extend(close(4029));
        server.write_all(&more).await.unwrap();
        member.fill().await.unwrap();
        assert!(member.text_buffered(), "a text behind two pings");
        assert_eq!(member.next_text().await.unwrap(), Some(&b"copy"[..]));
        for ping in [b"p1", b"p2"] {
            assert_eq!(
                read_client_frame(&mut server).await,
                (OPCODE_PONG, ping.to_vec())
            );
        }
        assert!(member.text_buffered(), "a close ends the wait");
        assert_eq!(member.next_text().await.unwrap(), None);
        assert_eq!(member.closed_with(), Some(4029));
    }

    #[tokio::test]
    async fn a_wrong_accept_key_or_a_refusal_fails_the_connection() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (member, _server) = tokio::join!(
            Member::handshake(client, "h", "/"),
            serve_upgrade(server, Some("bm90IHRoZSBrZXk="), b""),
        );
        let error = member.err().expect("refused").to_string();
        assert!(error.contains("Sec-WebSocket-Accept"), "{error}");

        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (member, ()) = tokio::join!(Member::handshake(client, "h", "/"), async {
            server
                .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let error = member.err().expect("refused").to_string();
        assert!(error.contains("401"), "{error}");
    }

    /// Frames of every length encoding, delivered a byte at a time, come
    /// out whole and in order; a large one does not keep its buffer.
    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole() {
        let (mut member, mut server) = connected(b"").await;
        let (short, medium, long) = (vec![b'a'; 100], vec![b'b'; 300], vec![b'c'; 70_000]);
        let mut bytes = text(&short);
        bytes.extend(text(&medium));
        bytes.extend(text(&long));
        bytes.extend(text(&short));
        let writer = tokio::spawn(async move {
            for byte in bytes {
                server.write_all(&[byte]).await.unwrap();
            }
            server
        });
        assert_eq!(member.next_text().await.unwrap(), Some(&short[..]));
        assert_eq!(member.next_text().await.unwrap(), Some(&medium[..]));
        assert_eq!(member.next_text().await.unwrap(), Some(&long[..]));
        assert_eq!(member.next_text().await.unwrap(), Some(&short[..]));
        drop(writer.await.unwrap());
        assert_eq!(member.next_text().await.unwrap(), None, "end of stream");
        assert_eq!(member.buf.len(), READ_CHUNK, "shrunk at the next read");
    }

    /// A ping is answered with a masked pong carrying its payload, without
    /// being handed out; a close is echoed and ends the connection.
    #[tokio::test]
    async fn pings_are_answered_and_a_close_ends_the_connection() {
        let mut then = frame(OPCODE_PING, b"p1");
        then.extend(frame(OPCODE_PONG, b""));
        then.extend(text(b"after"));
        then.extend(frame(OPCODE_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e']));
        let (mut member, mut server) = connected(&then).await;
        assert_eq!(member.next_text().await.unwrap(), Some(&b"after"[..]));
        assert_eq!(
            read_client_frame(&mut server).await,
            (OPCODE_PONG, b"p1".to_vec())
        );
        assert_eq!(member.next_text().await.unwrap(), None);
        assert_eq!(
            read_client_frame(&mut server).await,
            (OPCODE_CLOSE, vec![0x03, 0xE8])
        );
    }

    /// Text frames of every length encoding reach the server masked, whole
    /// and in order, those queued together in one write; a pong answered
    /// meanwhile follows what was queued.
    #[tokio::test]
    async fn sent_frames_arrive_masked_whole_and_in_order() {
        let (mut member, mut server) = connected(&frame(OPCODE_PING, b"p")).await;
        let (short, medium, long) = (vec![b'a'; 125], vec![b'b'; 126], vec![b'c'; 70_000]);
        member.send_text(&short).await.unwrap();
        member.queue_text(&medium);
        member.queue_text(&long);
        member.flush().await.unwrap();
        for expected in [&short, &medium, &long] {
            assert_eq!(
                read_client_frame(&mut server).await,
                (OPCODE_TEXT, expected.clone())
            );
        }
        member.queue_text(b"queued");
        server.write_all(&text(b"reply")).await.unwrap();
        assert_eq!(member.next_text().await.unwrap(), Some(&b"reply"[..]));
        assert_eq!(
            read_client_frame(&mut server).await,
            (OPCODE_TEXT, b"queued".to_vec())
        );
        assert_eq!(
            read_client_frame(&mut server).await,
            (OPCODE_PONG, b"p".to_vec())
        );
    }

    /// A flush cut short (its future dropped while the socket was full, as
    /// a pong's inside a cancelled `next_text`) leaves the rest for the
    /// next flush: each frame arrives once and whole.
    #[tokio::test]
    async fn a_flush_cut_short_is_finished_by_the_next() {
        use futures_util::FutureExt;
        let (mut member, mut server) = connected(&[]).await;
        // More than the pipe between them holds (1 MiB).
        let big = vec![b'x'; 3 << 19];
        member.queue_text(&big);
        assert!(member.flush().now_or_never().is_none(), "the pipe is full");
        member.queue_text(b"next");
        let reader = tokio::spawn(async move {
            let first = read_client_frame(&mut server).await;
            (first, read_client_frame(&mut server).await, server)
        });
        member.flush().await.unwrap();
        let (first, second, _server) = reader.await.unwrap();
        assert_eq!(first, (OPCODE_TEXT, big));
        assert_eq!(second, (OPCODE_TEXT, b"next".to_vec()));
    }

    /// Replies are told apart as the server writes them, and nothing a
    /// user writes passes for one.
    #[test]
    fn replies_are_told_by_their_type() {
        let ack = ServerFrame::Ack {
            client_id: Some("1-7"),
            id: "x",
            seq: 1,
            created_at: String::new(),
        };
        assert_eq!(reply(ack.to_json().as_bytes()), Reply::Ack);
        let error = ServerFrame::Error {
            code: "rate_limited",
            message: "slow down",
            retry_after_ms: Some(5),
            client_id: Some("1-8"),
        };
        assert_eq!(reply(error.to_json().as_bytes()), Reply::Error);
        let message = WireMessage {
            room_id: "bench-1".into(),
            id: "0193a1b2".into(),
            seq: 42,
            user: WireUser {
                id: "m-1".into(),
                name: r#""type":"ack""#.into(),
            },
            body: r#""type":"error""#.into(),
            client_id: Some("1-7".into()),
            created_at: 1_733_000_000_000,
            deleted: false,
            received_at_us: None,
        };
        let json = ServerFrame::for_message(&message).to_json();
        assert_eq!(reply(json.as_bytes()), Reply::Other);
        assert_eq!(reply(b"not json"), Reply::Other);
    }

    #[tokio::test]
    async fn a_fragmented_masked_or_oversized_control_frame_is_an_error() {
        let long_ping = frame(OPCODE_PING, &[0; 126]);
        for bad in [
            vec![OPCODE_TEXT, 1, b'x'],         // FIN clear
            vec![0x80, 1, b'x'],                // continuation
            vec![0x80 | OPCODE_TEXT | 0x40, 0], // RSV1 (compression)
            vec![0x80 | OPCODE_TEXT, 0x81, 0, 0, 0, 0, b'x'],
            long_ping,
        ] {
            let (mut member, _server) = connected(&bad).await;
            let error = member.next_text().await.expect_err("invalid");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }

    /// The stamp is found in a `message` frame exactly as the server
    /// serialises it, whatever the user's name holds.
    #[test]
    fn the_stamp_is_read_from_a_real_message_frame() {
        let message = |body: &str, name: &str| WireMessage {
            room_id: "bench-1".into(),
            id: "0193a1b2".into(),
            seq: 42,
            user: WireUser {
                id: "m-1".into(),
                name: name.into(),
            },
            body: body.into(),
            client_id: Some("1-7".into()),
            created_at: 1_733_000_000_000,
            deleted: false,
            received_at_us: None,
        };
        let json = |m: &WireMessage| ServerFrame::for_message(m).to_json();
        assert_eq!(
            delivery_stamp(json(&message("t:1733000000123456:3", "m")).as_bytes()),
            Some((1_733_000_000_123_456, 3))
        );
        // A name that spells the keys does not fool it: its quotes are
        // escaped.
        let tricky = message("hello", r#""type":"message","body":"t:1:2""#);
        assert_eq!(delivery_stamp(json(&tricky).as_bytes()), None);
        assert_eq!(
            delivery_stamp(json(&message("t:x:1", "m")).as_bytes()),
            None
        );
        let ack = ServerFrame::Ack {
            client_id: Some("t:1:1"),
            id: "x",
            seq: 1,
            created_at: String::new(),
        };
        assert_eq!(delivery_stamp(ack.to_json().as_bytes()), None);
    }
}
