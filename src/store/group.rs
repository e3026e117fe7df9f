//! Group commit: concurrent appends share one transaction.
//!
//! Every append is queued; committer tasks take whatever has queued up (up
//! to a bound) and store it in one transaction through [`AppendBatch`]. An
//! append of several messages (a connection's sends that arrived together)
//! is queued as one group, never split between transactions, so they are
//! stored in their order whatever happens to other transactions. No
//! timer delays a lone message: under light load a batch is the one message
//! that arrived, and its latency is one transaction; under heavy load the
//! messages that arrive while a transaction is in flight form the next
//! batch, so one commit (one fsync, one round-trip chain) pays for many
//! messages. The wait is bounded by the commit in flight.
//!
//! With several committers, the next committer waits for the transaction in
//! flight to finish, for at most [`STALLED_AFTER`], before it takes a batch:
//! overlapping transactions would split the arrivals into batches half as
//! large and double the commits, and a commit's fixed cost is most of its
//! cost while batches are small. The spare committers are there for the
//! transaction that hangs (waiting on a room lock held by another pod, or
//! on a slow disk), not for throughput.
//!
//! Guarantees are those of [`Store::append`](super::Store::append): an
//! `Ok` means committed; a message refused on its own merits (its room is
//! gone) fails alone; when the transaction fails, every message of the
//! batch gets the error and nothing of it is stored.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use super::{Appended, NewMessage};
use crate::{domain::Message, error::ChatError};

/// A backend's way of storing many messages in one transaction.
#[async_trait]
pub trait AppendBatch: Send + Sync + 'static {
    /// Stores `batch` in one transaction, in order: per-room seqs follow
    /// the batch order, and a repeat of a `(room, user, client_id)` earlier
    /// in the batch is a duplicate of it. The outer error means the
    /// transaction failed and nothing was stored.
    async fn append_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError>;
}

/// The results of a group, in its order.
type Results = Vec<Result<Appended, ChatError>>;

/// A group of messages stored together, and where their results go.
type Request = (Vec<NewMessage>, oneshot::Sender<Results>);

/// The longest a committer waits for the transaction in flight before it
/// starts the next batch beside it. Far above a healthy commit (well under
/// a millisecond on the reference machine, a few across a network).
pub const STALLED_AFTER: Duration = Duration::from_millis(10);

/// The queue in front of the committers.
pub struct GroupCommit {
    queue: mpsc::Sender<Request>,
}

impl GroupCommit {
    /// Starts `committers` tasks (transactions in flight at once) taking
    /// batches of about `max_batch` messages (a group that does not fit
    /// whole goes into the batch, which may then hold up to one group more).
    pub fn start(target: Arc<dyn AppendBatch>, committers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::channel(max_batch * committers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let in_flight = Arc::new(watch::Sender::new(0usize));
        for _ in 0..committers.max(1) {
            tokio::spawn(commit_loop(
                Arc::clone(&target),
                Arc::clone(&receiver),
                Arc::clone(&in_flight),
                max_batch.max(1),
            ));
        }
        Self { queue }
    }

    /// Stores `messages` in one transaction, in their order: one result
    /// each, in the same order.
    pub async fn append_all(&self, messages: Vec<NewMessage>) -> Results {
        let count = messages.len();
        if count == 0 {
            return Vec::new();
        }
        let (reply, answer) = oneshot::channel();
        if self.queue.send((messages, reply)).await.is_err() {
            return stopped(count);
        }
        answer.await.unwrap_or_else(|_| stopped(count))
    }
}

fn stopped(count: usize) -> Results {
    ChatError::Internal(anyhow::anyhow!("the group committer stopped")).for_each(count)
}

/// `in_flight` counts the transactions being committed.
async fn commit_loop(
    target: Arc<dyn AppendBatch>,
    receiver: Arc<Mutex<mpsc::Receiver<Request>>>,
    in_flight: Arc<watch::Sender<usize>>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    let mut idle = in_flight.subscribe();
    loop {
        // Only the committer holding the lock waits for work; the others
        // are committing. The lock is released before committing.
        let mut queue = receiver.lock().await;
        // Messages arriving meanwhile queue up and make the batch larger.
        let _ = tokio::time::timeout(STALLED_AFTER, idle.wait_for(|&n| n == 0)).await;
        let Some(mut request) = queue.recv().await else {
            return; // every sender is gone: the store was dropped
        };
        loop {
            let (messages, reply) = request;
            replies.push((reply, messages.len()));
            batch.extend(messages);
            if batch.len() >= max_batch {
                break;
            }
            match queue.try_recv() {
                Ok(next) => request = next,
                Err(_) => break,
            }
        }
        drop(queue);
        metrics::histogram!("chat_store_batch_size").record(batch.len() as f64);
        let results = {
            let _counted = InFlight::enter(&in_flight);
            commit(target.as_ref(), &batch).await
        };
        let mut results = results.into_iter();
        for (reply, count) in replies.drain(..) {
            // The caller may have gone (connection closed): its messages
            // are stored all the same.
            let _ = reply.send(results.by_ref().take(count).collect());
        }
        batch.clear();
    }
}

/// Counts one transaction in flight until dropped, so a committer that
/// panics mid-commit does not make the others wait for it forever.
struct InFlight<'a>(&'a watch::Sender<usize>);

impl<'a> InFlight<'a> {
    fn enter(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// One transaction for the batch. If it fails for a reason other than an
/// unreachable database, one message may be to blame: each is then tried
/// alone, so one bad message cannot fail the others.
async fn commit(
    target: &dyn AppendBatch,
    batch: &[NewMessage],
) -> Vec<Result<Appended, ChatError>> {
    match target.append_batch(batch).await {
        Ok(results) => results,
        Err(err @ ChatError::Unavailable(_)) => err.for_each(batch.len()),
        Err(err) if batch.len() == 1 => vec![Err(err)],
        Err(err) => {
            tracing::warn!(error = %err, size = batch.len(), "batch append failed; appending one by one");
            let mut results = Vec::with_capacity(batch.len());
            for message in batch {
                let one = target.append_batch(std::slice::from_ref(message)).await;
                results.push(one.and_then(|mut one| {
                    one.pop()
                        .unwrap_or_else(|| Err(ChatError::Internal(anyhow::anyhow!("no result"))))
                }));
            }
            results
        }
    }
}

/// A batch split for a backend: the messages it stores, and the repeats of
/// an idempotency key within the batch, which never reach it and are each
/// answered from their key's first occurrence.
pub(super) struct Distinct<'a> {
    batch: &'a [NewMessage],
    /// The batch without repeats, in batch order.
    pub messages: Vec<&'a NewMessage>,
    /// `slot[i]`: the element of `messages` that answers batch message i.
    slot: Vec<usize>,
}

/// What became of one of [`Distinct::messages`].
pub(super) enum Outcome {
    /// Stored now with this seq.
    Stored(u64),
    /// A retry of a committed send: the original.
    Duplicate(Message),
    /// Not stored: its room does not exist.
    NoRoom,
}

/// The outcome of element `index` of [`Distinct::messages`], as a row
/// returned by the database numbers it.
pub(super) fn outcome_at(outcomes: &mut [Outcome], index: i64) -> Result<&mut Outcome, ChatError> {
    usize::try_from(index)
        .ok()
        .and_then(|j| outcomes.get_mut(j))
        .ok_or_else(|| {
            ChatError::Internal(anyhow::anyhow!("a row for element {index} of the batch"))
        })
}

/// A message's idempotency key: room, user, client id.
type Key<'a> = (&'a str, &'a str, &'a str);

impl<'a> Distinct<'a> {
    pub fn of(batch: &'a [NewMessage]) -> Self {
        let mut messages: Vec<&NewMessage> = Vec::with_capacity(batch.len());
        let mut slot = Vec::with_capacity(batch.len());
        let mut first: HashMap<Key<'a>, usize> = HashMap::new();
        for message in batch {
            let key = message.client_id.as_ref().map(|client_id| {
                (
                    message.room_id.as_str(),
                    message.user.id.as_str(),
                    client_id.as_str(),
                )
            });
            let j = match key {
                Some(key) => *first.entry(key).or_insert(messages.len()),
                None => messages.len(),
            };
            if j == messages.len() {
                messages.push(message);
            }
            slot.push(j);
        }
        Self {
            batch,
            messages,
            slot,
        }
    }

    /// One outcome per element of [`Distinct::messages`], each `NoRoom`
    /// until the backend's answer says otherwise.
    pub fn unanswered(&self) -> Vec<Outcome> {
        self.messages.iter().map(|_| Outcome::NoRoom).collect()
    }

    /// Every batch message's result, in batch order, given the outcome of
    /// each of [`Distinct::messages`].
    pub fn answer(self, outcomes: &[Outcome]) -> Vec<Result<Appended, ChatError>> {
        self.batch
            .iter()
            .zip(self.slot)
            .map(|(message, j)| match &outcomes[j] {
                Outcome::NoRoom => Err(ChatError::room_not_found()),
                Outcome::Duplicate(original) => Ok(Appended::Duplicate(original.clone())),
                // A repeat within the batch of a message stored now.
                Outcome::Stored(seq) if !std::ptr::eq(message, self.messages[j]) => {
                    Ok(Appended::Duplicate(self.messages[j].stored(*seq)))
                }
                Outcome::Stored(seq) => Ok(Appended::Stored(message.stored(*seq))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use tokio::sync::Notify;

    use super::*;
    use crate::testing::new_message;

    /// Commits take `commit_time` of (paused) tokio time, except that the
    /// first one waits for `release` when `hang_first` is set. Records each
    /// batch's bodies and the most transactions ever in flight together.
    #[derive(Default)]
    struct Recorder {
        commit_time: Duration,
        hang_first: bool,
        release: Notify,
        started: Notify,
        state: StdMutex<State>,
    }

    #[derive(Default)]
    struct State {
        batches: Vec<Vec<String>>,
        in_flight: usize,
        most_in_flight: usize,
    }

    #[async_trait]
    impl AppendBatch for Recorder {
        async fn append_batch(
            &self,
            batch: &[NewMessage],
        ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
            let first = {
                let mut state = self.state.lock().unwrap();
                state
                    .batches
                    .push(batch.iter().map(|m| m.body.clone()).collect());
                state.in_flight += 1;
                state.most_in_flight = state.most_in_flight.max(state.in_flight);
                state.batches.len() == 1
            };
            self.started.notify_one();
            if first && self.hang_first {
                self.release.notified().await;
            } else {
                tokio::time::sleep(self.commit_time).await;
            }
            self.state.lock().unwrap().in_flight -= 1;
            Ok(batch
                .iter()
                .enumerate()
                .map(|(i, m)| Ok(Appended::Stored(m.stored(i as u64 + 1))))
                .collect())
        }
    }

    /// Appends `bodies` as one group, from a task of its own.
    fn send_all(group: &Arc<GroupCommit>, bodies: &[&str]) -> tokio::task::JoinHandle<Results> {
        let group = Arc::clone(group);
        let messages = bodies
            .iter()
            .map(|body| new_message("lobby", "ada", body, None))
            .collect();
        tokio::spawn(async move { group.append_all(messages).await })
    }

    fn send(
        group: &Arc<GroupCommit>,
        body: &str,
    ) -> tokio::task::JoinHandle<Result<Appended, ChatError>> {
        let group = Arc::clone(group);
        let message = new_message("lobby", "ada", body, None);
        tokio::spawn(async move { group.append_all(vec![message]).await.pop().unwrap() })
    }

    fn seq(result: &Result<Appended, ChatError>) -> u64 {
        match result {
            Ok(Appended::Stored(message)) => message.seq,
            other => panic!("not stored: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_arriving_during_a_healthy_commit_wait_for_it_and_share_the_next() {
        let recorder = Arc::new(Recorder {
            commit_time: STALLED_AFTER / 4,
            ..Recorder::default()
        });
        let group = Arc::new(GroupCommit::start(recorder.clone(), 2, 64));
        let first = send(&group, "first");
        recorder.started.notified().await;
        let rest: Vec<_> = (0..5)
            .map(|i| send(&group, &format!("later {i}")))
            .collect();
        assert!(first.await.unwrap().is_ok());
        for sent in rest {
            assert!(sent.await.unwrap().is_ok());
        }
        let state = recorder.state.lock().unwrap();
        let sizes: Vec<usize> = state.batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 5], "the later sends form one batch");
        assert_eq!(
            state.most_in_flight, 1,
            "no second transaction beside a healthy one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_commit_does_not_hold_up_the_next_batch() {
        let recorder = Arc::new(Recorder {
            commit_time: STALLED_AFTER / 4,
            hang_first: true,
            ..Recorder::default()
        });
        let group = Arc::new(GroupCommit::start(recorder.clone(), 2, 64));
        let first = send(&group, "first");
        recorder.started.notified().await;
        let second = send(&group, "second");
        assert!(
            second.await.unwrap().is_ok(),
            "committed beside the hung one"
        );
        assert!(!first.is_finished());
        assert_eq!(recorder.state.lock().unwrap().most_in_flight, 2);
        recorder.release.notify_one();
        assert!(first.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_goes_into_one_transaction_whole_and_in_its_order() {
        let recorder = Arc::new(Recorder {
            commit_time: STALLED_AFTER / 4,
            ..Recorder::default()
        });
        // Batches of two: the group of three does not fit beside "before".
        let group = Arc::new(GroupCommit::start(recorder.clone(), 2, 2));
        let first = send(&group, "first");
        recorder.started.notified().await;
        let before = send(&group, "before");
        tokio::task::yield_now().await;
        let three = send_all(&group, &["g1", "g2", "g3"]);
        tokio::task::yield_now().await;
        let after = send(&group, "after");
        assert!(first.await.unwrap().is_ok());
        assert_eq!(seq(&before.await.unwrap()), 1);
        let three = three.await.unwrap();
        assert_eq!(
            three.iter().map(seq).collect::<Vec<_>>(),
            vec![2, 3, 4],
            "one result per message, in the group's order"
        );
        assert!(after.await.unwrap().is_ok());
        let batches = recorder.state.lock().unwrap().batches.clone();
        assert_eq!(
            batches,
            vec![
                vec!["first"],
                vec!["before", "g1", "g2", "g3"],
                vec!["after"],
            ],
            "the group is not split, and keeps its order"
        );
        assert!(group.append_all(Vec::new()).await.is_empty());
        assert_eq!(
            recorder.state.lock().unwrap().batches.len(),
            3,
            "an empty group stores nothing"
        );
    }
}
