//! A connection's queue of frames from the hub.
//!
//! Bounded: the hub never waits on a connection; when the queue is full the
//! connection is too slow and the hub closes it (4008). Frames are shared
//! bytes, serialized once per event for every queue.
//!
//! Written for the many idle connections a pod holds: an emptied outbox
//! gives its memory back (a channel keeps a block of slots per connection
//! for its life). The price, an allocation per burst, is small next to the
//! system call that writes the burst.

use std::{
    collections::VecDeque,
    sync::Mutex,
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    state: Mutex<State>,
    /// The session waiting for frames, if any.
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    closed: bool,
}

/// What became of a pushed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue holds `capacity` frames: the reader is too slow.
    Full,
    /// The connection has ended.
    Closed,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (each
        // operation is one VecDeque call), so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, frame: Utf8Bytes) -> Pushed {
        {
            let mut state = self.state();
            if state.closed {
                return Pushed::Closed;
            }
            if state.frames.len() >= self.capacity {
                return Pushed::Full;
            }
            state.frames.push_back(frame);
        }
        self.waker.wake();
        Pushed::Queued
    }

    /// Ready once a frame is queued. (A closed outbox holds none, so it
    /// stays pending: the session closes it only after its last wait.)
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.state().frames.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Waits until a frame is queued.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Takes up to `max` frames, oldest first, under one lock.
    pub fn take(&self, max: usize, mut each: impl FnMut(Utf8Bytes)) {
        let mut state = self.state();
        let n = max.min(state.frames.len());
        for frame in state.frames.drain(..n) {
            each(frame);
        }
        if state.frames.is_empty() {
            state.frames = VecDeque::new();
        }
    }

    /// Refuses further frames and drops the queued ones.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.frames = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn frame(text: &str) -> Utf8Bytes {
        Utf8Bytes::from(text.to_owned())
    }

    fn taken(outbox: &Outbox, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        outbox.take(max, |f| out.push(f.as_str().to_owned()));
        out
    }

    #[test]
    fn frames_come_out_in_order_and_a_full_queue_refuses() {
        let outbox = Outbox::new(3);
        for text in ["a", "b", "c"] {
            assert_eq!(outbox.push(frame(text)), Pushed::Queued);
        }
        assert_eq!(outbox.push(frame("d")), Pushed::Full);
        assert_eq!(taken(&outbox, 2), ["a", "b"]);
        assert_eq!(outbox.push(frame("e")), Pushed::Queued);
        assert_eq!(taken(&outbox, 10), ["c", "e"]);
        assert!(taken(&outbox, 10).is_empty());
    }

    #[test]
    fn a_closed_outbox_refuses_and_forgets() {
        let outbox = Outbox::new(3);
        outbox.push(frame("a"));
        outbox.close();
        assert_eq!(outbox.push(frame("b")), Pushed::Closed);
        assert!(taken(&outbox, 10).is_empty());
    }

    #[test]
    fn an_emptied_queue_gives_back_what_a_burst_grew() {
        let outbox = Outbox::new(1000);
        for i in 0..500 {
            outbox.push(frame(&i.to_string()));
        }
        assert_eq!(taken(&outbox, 1000).len(), 500);
        assert_eq!(outbox.state().frames.capacity(), 0);
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_on_push() {
        let outbox = Arc::new(Outbox::new(3));
        let waiter = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            async move { outbox.ready().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "nothing queued yet");
        outbox.push(frame("x"));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken by the push")
            .expect("the waiter");
        assert_eq!(taken(&outbox, 1), ["x"]);
    }
}
