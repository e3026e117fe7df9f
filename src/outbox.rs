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
//!
//! The waiting session's waker lives under the queue's lock, and it is kept
//! (woken by reference), not taken: a session registers only when it finds
//! the queue empty, and registering the same task again is a comparison,
//! not a clone. Once per delivery, that is the hot path of fan-out.

use std::{
    collections::VecDeque,
    sync::Mutex,
    task::{Context, Poll, Waker},
};

use tokio_tungstenite::tungstenite::Utf8Bytes;

#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    closed: bool,
    /// The session's waker, from its last wait.
    waker: Option<Waker>,
    /// Whether the session is waiting (found the queue empty since it was
    /// last woken).
    waiting: bool,
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
        let mut state = self.state();
        if state.closed {
            return Pushed::Closed;
        }
        if state.frames.len() >= self.capacity {
            return Pushed::Full;
        }
        state.frames.push_back(frame);
        if std::mem::take(&mut state.waiting)
            && let Some(waker) = &state.waker
        {
            // Only schedules the task: it takes this lock after we let go.
            waker.wake_by_ref();
        }
        Pushed::Queued
    }

    /// Ready once a frame is queued. (A closed outbox holds none, so it
    /// stays pending: the session closes it only after its last wait.)
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state();
        if !state.frames.is_empty() {
            return Poll::Ready(());
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        state.waiting = true;
        Poll::Pending
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
        state.waker = None;
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

    /// A task waker that counts its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let count = Arc::new(Counting(0.into()));
        (Arc::clone(&count), Waker::from(count))
    }

    fn wakes(count: &Counting) -> usize {
        count.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_push_wakes_the_latest_waiter_once() {
        let outbox = Outbox::new(10);
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        // The task moved to another waker before anything came.
        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        outbox.push(frame("a"));
        outbox.push(frame("b"));
        assert_eq!((wakes(&first), wakes(&second)), (0, 1));

        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&second_waker))
                .is_ready()
        );
        assert_eq!(taken(&outbox, 10), ["a", "b"]);
        outbox.push(frame("c"));
        assert_eq!(wakes(&second), 1, "not waiting: nothing to wake");
        taken(&outbox, 10);
        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        outbox.push(frame("d"));
        assert_eq!(wakes(&second), 2);
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
