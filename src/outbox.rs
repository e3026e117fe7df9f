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
//!
//! A frame for a session that is parked (waiting for anything, with nothing
//! queued and nothing of its own unwritten) skips the queue: the pusher
//! hands it to the connection's [`Writer`] at once, and the session is not
//! woken at all. That saves a task's wake, its poll and the queue's
//! allocation for each delivery, most of the user-space cost of fan-out.
//! The session decides when it is parked (see [`Outbox::poll_park`]), so
//! frames still follow everything it writes itself (its `ready`, replay,
//! answers) in the order it means.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use tokio_tungstenite::tungstenite::Utf8Bytes;

#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    state: Mutex<State>,
}

/// Writes a frame to the connection's socket without waiting, for a
/// parked session.
pub trait Writer: Send + Sync {
    /// Writes text frames carrying `payloads`, in order and in one write,
    /// if the socket is free (the session is not using it and has nothing
    /// unwritten); never waits.
    fn write_now(&self, payloads: &mut dyn Iterator<Item = &[u8]>) -> WriteNow;
}

/// What [`Writer::write_now`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteNow {
    /// Written whole.
    Done,
    /// Taken, but the socket did not take all of them (or failed): the
    /// session must flush the rest before anything else.
    Owed,
    /// Not taken: nothing was written.
    Busy,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    closed: bool,
    /// The session's waker, from its last wait.
    waker: Option<Waker>,
    /// Whether (and how) the session waits for this outbox.
    wait: Wait,
    /// A frame was handed to `writer` but not all of it left: the session
    /// must flush before it parks again.
    owed: bool,
    writer: Option<Arc<dyn Writer>>,
}

/// Whether the session waits for this outbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Not since it was last woken: a push need not wake it.
    #[default]
    No,
    /// It found the queue empty and waits, while doing something of its
    /// own (a send being stored): frames queue behind what it writes.
    Waiting,
    /// It waits with nothing of its own to write: a frame may go straight
    /// to `writer`.
    Parked,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("frames", &self.frames.len())
            .field("closed", &self.closed)
            .field("wait", &self.wait)
            .field("owed", &self.owed)
            .finish_non_exhaustive()
    }
}

/// What became of pushed frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Handed to the connection's socket.
    Written,
    Queued,
    /// The queue has no room for them (it holds up to `capacity` frames):
    /// the reader is too slow.
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

    /// An outbox that writes to `writer` directly while its session is
    /// parked.
    pub fn with_writer(capacity: usize, writer: Arc<dyn Writer>) -> Self {
        let outbox = Self::new(capacity);
        outbox.state().writer = Some(writer);
        outbox
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (each
        // operation is one VecDeque call), so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `frames` to the socket in one write when `direct` and the
    /// session is parked, or queues them and wakes the session. All or
    /// none: frames that do not all fit in the queue are refused together.
    pub fn push<'a, I>(&self, frames: I, direct: bool) -> Pushed
    where
        I: Iterator<Item = &'a Utf8Bytes> + Clone,
    {
        let mut state = self.state();
        if state.closed {
            return Pushed::Closed;
        }
        if direct
            && state.wait == Wait::Parked
            && let Some(writer) = &state.writer
        {
            // Parked: nothing is queued or owed, the session is not writing.
            match writer.write_now(&mut frames.clone().map(|f| f.as_bytes())) {
                WriteNow::Done => return Pushed::Written,
                WriteNow::Owed => {
                    state.owed = true;
                    state.wake();
                    return Pushed::Written;
                }
                WriteNow::Busy => {}
            }
        }
        if state.frames.len() + frames.clone().count() > self.capacity {
            return Pushed::Full;
        }
        state.frames.extend(frames.cloned());
        state.wake();
        Pushed::Queued
    }

    /// Ready once a frame is queued. (A closed outbox holds none, so it
    /// stays pending: the session closes it only after its last wait.)
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_wait(cx, false)
    }

    /// [`Self::poll_ready`] for a session that, while pending, has nothing
    /// of its own to write and lets frames go to its socket directly until
    /// [`Self::unpark`]. Also ready when a direct write left bytes unwritten.
    pub fn poll_park(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_wait(cx, true)
    }

    /// The session is busy (it was woken by something else than this
    /// outbox): frames queue again.
    pub fn unpark(&self) {
        self.state().unpark();
    }

    fn poll_wait(&self, cx: &mut Context<'_>, park: bool) -> Poll<()> {
        let mut state = self.state();
        // The session's next write flushes what is owed.
        let owed = std::mem::take(&mut state.owed);
        if owed || !state.frames.is_empty() {
            state.unpark();
            return Poll::Ready(());
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        state.wait = if park { Wait::Parked } else { Wait::Waiting };
        Poll::Pending
    }

    /// Waits until a frame is queued.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Takes up to `max` frames, oldest first, under one lock; returns how
    /// many.
    pub fn take(&self, max: usize, mut each: impl FnMut(Utf8Bytes)) -> usize {
        let mut state = self.state();
        let n = max.min(state.frames.len());
        for frame in state.frames.drain(..n) {
            each(frame);
        }
        if state.frames.is_empty() {
            state.frames = VecDeque::new();
        }
        n
    }

    /// Refuses further frames and drops the queued ones.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.frames = VecDeque::new();
        state.waker = None;
        state.writer = None;
        state.unpark();
    }
}

impl State {
    /// Wakes the session if it waits (it then takes this lock after we
    /// let go).
    fn wake(&mut self) {
        if std::mem::take(&mut self.wait) != Wait::No
            && let Some(waker) = &self.waker
        {
            waker.wake_by_ref();
        }
    }

    /// Frames queue again, for a session that still waits.
    fn unpark(&mut self) {
        if self.wait == Wait::Parked {
            self.wait = Wait::Waiting;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn frame(text: &str) -> Utf8Bytes {
        Utf8Bytes::from(text.to_owned())
    }

    fn push(outbox: &Outbox, texts: &[&str]) -> Pushed {
        let frames: Vec<Utf8Bytes> = texts.iter().map(|t| frame(t)).collect();
        outbox.push(frames.iter(), true)
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
            assert_eq!(push(&outbox, &[text]), Pushed::Queued);
        }
        assert_eq!(push(&outbox, &["d"]), Pushed::Full);
        assert_eq!(taken(&outbox, 2), ["a", "b"]);
        assert_eq!(push(&outbox, &["e"]), Pushed::Queued);
        assert_eq!(taken(&outbox, 10), ["c", "e"]);
        assert!(taken(&outbox, 10).is_empty());
    }

    #[test]
    fn a_closed_outbox_refuses_and_forgets() {
        let outbox = Outbox::new(3);
        push(&outbox, &["a"]);
        outbox.close();
        assert_eq!(push(&outbox, &["b"]), Pushed::Closed);
        assert!(taken(&outbox, 10).is_empty());
    }

    #[test]
    fn an_emptied_queue_gives_back_what_a_burst_grew() {
        let outbox = Outbox::new(1000);
        for i in 0..500 {
            push(&outbox, &[&i.to_string()]);
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
        push(&outbox, &["a"]);
        push(&outbox, &["b"]);
        assert_eq!((wakes(&first), wakes(&second)), (0, 1));

        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&second_waker))
                .is_ready()
        );
        assert_eq!(taken(&outbox, 10), ["a", "b"]);
        push(&outbox, &["c"]);
        assert_eq!(wakes(&second), 1, "not waiting: nothing to wake");
        taken(&outbox, 10);
        assert!(
            outbox
                .poll_ready(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        push(&outbox, &["d"]);
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
        push(&outbox, &["x"]);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken by the push")
            .expect("the waiter");
        assert_eq!(taken(&outbox, 1), ["x"]);
    }

    /// A socket that answers as told and records what it took.
    struct Socket {
        answer: Mutex<WriteNow>,
        writes: Mutex<Vec<Vec<String>>>,
    }

    impl Socket {
        fn answering(answer: WriteNow) -> Arc<Self> {
            Arc::new(Self {
                answer: Mutex::new(answer),
                writes: Mutex::default(),
            })
        }

        fn writes(&self) -> Vec<Vec<String>> {
            self.writes.lock().unwrap().clone()
        }
    }

    impl Writer for Socket {
        fn write_now(&self, payloads: &mut dyn Iterator<Item = &[u8]>) -> WriteNow {
            let answer = *self.answer.lock().unwrap();
            if answer != WriteNow::Busy {
                let texts = payloads
                    .map(|p| String::from_utf8(p.to_vec()).unwrap())
                    .collect();
                self.writes.lock().unwrap().push(texts);
            }
            answer
        }
    }

    /// An outbox of 10 on a socket answering `answer`, and its session's
    /// waker.
    fn on_socket(answer: WriteNow) -> (Arc<Socket>, Outbox, Arc<Counting>, Waker) {
        let socket = Socket::answering(answer);
        let outbox = Outbox::with_writer(10, Arc::clone(&socket) as Arc<dyn Writer>);
        let (count, waker) = counting();
        (socket, outbox, count, waker)
    }

    fn poll(outbox: &Outbox, waker: &Waker, park: bool) -> Poll<()> {
        let cx = &mut Context::from_waker(waker);
        if park {
            outbox.poll_park(cx)
        } else {
            outbox.poll_ready(cx)
        }
    }

    #[test]
    fn a_parked_session_gets_frames_written_at_once_without_a_wake() {
        let (socket, outbox, count, waker) = on_socket(WriteNow::Done);

        // Waiting, but not parked (e.g. while its own send is stored):
        // frames queue, so they follow what the session writes next.
        assert!(poll(&outbox, &waker, false).is_pending());
        assert_eq!(push(&outbox, &["a"]), Pushed::Queued);
        assert_eq!(wakes(&count), 1);
        assert!(socket.writes().is_empty());
        assert_eq!(taken(&outbox, 10), ["a"]);

        // Parked: a batch goes to the socket whole, in one write.
        assert!(poll(&outbox, &waker, true).is_pending());
        assert_eq!(push(&outbox, &["b", "c"]), Pushed::Written);
        assert_eq!(push(&outbox, &["d"]), Pushed::Written);
        assert_eq!(socket.writes(), [vec!["b", "c"], vec!["d"]]);
        assert_eq!(wakes(&count), 1, "the session was not woken");
        assert!(poll(&outbox, &waker, true).is_pending(), "nothing queued");
        assert!(taken(&outbox, 10).is_empty());
    }

    #[test]
    fn a_session_busy_with_something_else_gets_its_frames_queued() {
        let (socket, outbox, count, waker) = on_socket(WriteNow::Done);
        assert!(poll(&outbox, &waker, true).is_pending());
        outbox.unpark();
        assert_eq!(push(&outbox, &["a"]), Pushed::Queued);
        assert!(socket.writes().is_empty());
        assert_eq!(wakes(&count), 1, "still waiting: woken for the frame");
        assert!(poll(&outbox, &waker, true).is_ready());
        assert_eq!(taken(&outbox, 10), ["a"]);
    }

    #[test]
    fn a_busy_pod_queues_even_for_a_parked_session() {
        let (socket, outbox, count, waker) = on_socket(WriteNow::Done);
        assert!(poll(&outbox, &waker, true).is_pending());
        let frames = [frame("a"), frame("b")];
        assert_eq!(outbox.push(frames.iter(), false), Pushed::Queued);
        assert!(socket.writes().is_empty());
        assert_eq!(wakes(&count), 1);
        assert_eq!(taken(&outbox, 10), ["a", "b"]);
    }

    #[test]
    fn a_socket_in_use_gets_nothing_and_the_frames_queue() {
        let (socket, outbox, count, waker) = on_socket(WriteNow::Busy);
        assert!(poll(&outbox, &waker, true).is_pending());
        assert_eq!(push(&outbox, &["a"]), Pushed::Queued);
        assert_eq!(wakes(&count), 1);
        // No longer parked: the next frame queues behind without asking.
        *socket.answer.lock().unwrap() = WriteNow::Done;
        assert_eq!(push(&outbox, &["b"]), Pushed::Queued);
        assert!(socket.writes().is_empty());
        assert_eq!(taken(&outbox, 10), ["a", "b"]);
    }

    #[test]
    fn what_a_socket_left_unwritten_wakes_the_session_before_anything_else() {
        let (socket, outbox, count, waker) = on_socket(WriteNow::Owed);
        assert!(poll(&outbox, &waker, true).is_pending());
        assert_eq!(push(&outbox, &["a"]), Pushed::Written);
        assert_eq!(wakes(&count), 1, "woken to flush the rest");
        // Until the session has flushed, frames queue behind the rest.
        assert_eq!(push(&outbox, &["b"]), Pushed::Queued);
        assert!(poll(&outbox, &waker, true).is_ready());
        assert_eq!(taken(&outbox, 10), ["b"]);
        // Owed with nothing queued is still a reason to run, once.
        *socket.answer.lock().unwrap() = WriteNow::Owed;
        assert!(poll(&outbox, &waker, true).is_pending());
        assert_eq!(push(&outbox, &["c"]), Pushed::Written);
        assert!(poll(&outbox, &waker, true).is_ready());
        assert!(poll(&outbox, &waker, true).is_pending());
        assert_eq!(socket.writes(), [vec!["a"], vec!["c"]]);
    }

    #[test]
    fn frames_that_do_not_all_fit_are_refused_together() {
        let outbox = Outbox::new(3);
        assert_eq!(push(&outbox, &["a", "b"]), Pushed::Queued);
        assert_eq!(push(&outbox, &["c", "d"]), Pushed::Full);
        assert_eq!(push(&outbox, &["c"]), Pushed::Queued);
        assert_eq!(taken(&outbox, 10), ["a", "b", "c"]);
    }

    #[test]
    fn a_closed_outbox_lets_go_of_its_socket() {
        let (socket, outbox, _count, waker) = on_socket(WriteNow::Done);
        assert!(poll(&outbox, &waker, true).is_pending());
        outbox.close();
        assert_eq!(Arc::strong_count(&socket), 1);
        assert_eq!(push(&outbox, &["a"]), Pushed::Closed);
        assert!(socket.writes().is_empty());
    }
}
