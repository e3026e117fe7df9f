//! Group commit: concurrent appends share one transaction.
//!
//! Every append is queued; committer tasks take whatever has queued up (up
//! to a bound) and store it in one transaction through [`AppendBatch`]. No
//! timer is involved: under light load a batch is the one message that
//! arrived, and its latency is one transaction; under heavy load the
//! messages that arrive while a transaction is in flight form the next
//! batch, so one commit (one fsync, one round-trip chain) pays for many
//! messages. The wait is bounded by the commit in flight.
//!
//! Guarantees are those of [`Store::append`](super::Store::append): an
//! `Ok` means committed; a message refused on its own merits (its room is
//! gone) fails alone; when the transaction fails, every message of the
//! batch gets the error and nothing of it is stored.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Appended, NewMessage};
use crate::error::ChatError;

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

type Reply = oneshot::Sender<Result<Appended, ChatError>>;

/// The queue in front of the committers.
pub struct GroupCommit {
    queue: mpsc::Sender<(NewMessage, Reply)>,
}

impl GroupCommit {
    /// Starts `committers` tasks (transactions in flight at once) taking
    /// batches of at most `max_batch` messages.
    pub fn start(target: Arc<dyn AppendBatch>, committers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::channel(max_batch * committers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..committers.max(1) {
            tokio::spawn(commit_loop(
                Arc::clone(&target),
                Arc::clone(&receiver),
                max_batch.max(1),
            ));
        }
        Self { queue }
    }

    pub async fn append(&self, message: NewMessage) -> Result<Appended, ChatError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((message, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> ChatError {
    ChatError::Internal(anyhow::anyhow!("the group committer stopped"))
}

async fn commit_loop(
    target: Arc<dyn AppendBatch>,
    receiver: Arc<Mutex<mpsc::Receiver<(NewMessage, Reply)>>>,
    max_batch: usize,
) {
    let mut requests = Vec::with_capacity(max_batch);
    let mut batch = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    loop {
        // Only the committer holding the lock waits for work; the others
        // are committing. The lock is released before committing.
        let received = receiver
            .lock()
            .await
            .recv_many(&mut requests, max_batch)
            .await;
        if received == 0 {
            return; // every sender is gone: the store was dropped
        }
        for (message, reply) in requests.drain(..) {
            batch.push(message);
            replies.push(reply);
        }
        metrics::histogram!("chat_store_batch_size").record(batch.len() as f64);
        let results = commit(target.as_ref(), &batch).await;
        for (reply, result) in replies.drain(..).zip(results) {
            // The caller may have gone (connection closed): its message is
            // stored all the same, as with a plain append.
            let _ = reply.send(result);
        }
        batch.clear();
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
        Err(ChatError::Unavailable(cause)) => {
            let cause = format!("{cause:#}");
            batch
                .iter()
                .map(|_| Err(ChatError::Unavailable(anyhow::anyhow!("{cause}"))))
                .collect()
        }
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
