//! Presence shared by every instance through one Redis (a primary, possibly
//! with replicas; not Redis Cluster: the sweep touches keys of many rooms
//! and instances in one script).
//!
//! Keys, with `P` = `{prefix}pr:`:
//! - `P room:{room}:conns`, hash connection key → user id: every connection
//!   to the room, on any instance.
//! - `P room:{room}:users`, hash user id → number of those connections; a
//!   user is present iff they are in it.
//! - `P room:{room}:names`, hash user id → latest display name (what `list`
//!   reads).
//! - `P inst:{instance}`, set of `"{room} {connection key}"`: the connections
//!   an instance holds, so that sweeping a dead instance touches only its own
//!   connections instead of scanning every room (room ids have no spaces).
//! - `P live:{instance}`, a string whose TTL `keep_alive` refreshes.
//! - `P instances`, set of instances that may hold connections: where a
//!   sweep looks for dead ones. A dead instance leaves it once swept.
//!
//! Every change is one Lua script, so the count and the answer (first,
//! last, swept) are decided atomically on the server: two instances
//! connecting the same user cannot both see "first", and two sweepers
//! cannot both report the same user. Emptied hashes vanish by themselves.
//!
//! Redis may lose everything (it restarts without persistence) or this
//! instance may be swept while it was merely paused. Each instance therefore
//! mirrors its own live connections in memory and writes them back from
//! `keep_alive` when its liveness key turns out to be missing, without
//! announcing joins; the users it brings back may have been announced as
//! gone meanwhile. A disconnection Redis did not confirm is kept and retried
//! by the next `sweep`, which reports its `leave` like a dead instance's.
//!
//! Cadence: `keep_alive` and `sweep` every `ttl / 3` or so, and one
//! `keep_alive` before serving. A killed instance's users are then gone
//! within `ttl` plus one sweep interval.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::redis_conn::RedisConn;
use anyhow::anyhow;
use async_trait::async_trait;
use redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::sync::RwLock;

use super::{ConnectionKey, Presence};
use crate::{
    domain::{RoomId, User, UserId},
    error::ChatError,
};

/// Bound on a connect, disconnect, list or keep-alive, connection set-up
/// included: a hung Redis must not hold a WebSocket handshake for long.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Bound on each batch of a restore or a sweep.
const BATCH_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections per restore script, and (roughly) per sweep script: large
/// enough to be few round trips, small enough not to block Redis for long.
const BATCH: usize = 500;

/// Sweep scripts per `sweep` call; what is left waits for the next call.
const MAX_SWEEP_BATCHES: usize = 64;

/// Disconnections kept for a retry when Redis did not confirm them. Beyond
/// that they are dropped: their connections then linger until this
/// instance stops and is swept.
const MAX_UNCONFIRMED: usize = 10_000;

/// The scripts' shared helpers. Key names here must match the module doc.
/// A macro, not a const, so that `concat!` can prepend it to each script.
macro_rules! lua_helpers {
    () => {
        r#"
local function room_key(base, room, what)
  return base .. 'room:' .. room .. ':' .. what
end

-- Records `conn`; replaying it changes nothing, so restores are idempotent.
-- `rename` says whether an existing name is replaced by this one.
-- Returns true when it is the user's first connection to the room.
local function add_conn(base, inst, room, conn, user, name, rename)
  local names = room_key(base, room, 'names')
  if rename then
    redis.call('HSET', names, user, name)
  else
    redis.call('HSETNX', names, user, name)
  end
  redis.call('SADD', base .. 'inst:' .. inst, room .. ' ' .. conn)
  if redis.call('HSETNX', room_key(base, room, 'conns'), conn, user) == 0 then
    return false
  end
  return redis.call('HINCRBY', room_key(base, room, 'users'), user, 1) == 1
end

-- Forgets `conn` (not its entry in its instance's set: callers do that).
-- Returns the user and their name when it was their last connection.
local function remove_conn(base, room, conn)
  local conns = room_key(base, room, 'conns')
  local user = redis.call('HGET', conns, conn)
  if not user then
    return nil
  end
  redis.call('HDEL', conns, conn)
  local users = room_key(base, room, 'users')
  if redis.call('HINCRBY', users, user, -1) > 0 then
    return nil
  end
  local names = room_key(base, room, 'names')
  local name = redis.call('HGET', names, user) or ''
  redis.call('HDEL', users, user)
  redis.call('HDEL', names, user)
  return user, name
end
"#
    };
}

/// ARGV: base, instance, room, conn, user, name, ttl (ms).
/// Returns `{first, instance_was_missing}`. A connection must never sit
/// under an instance that looks dead (a sweep would take it at once), so
/// this also revives the liveness key, and says so: the caller then
/// restores its other connections, which a sweep may have taken.
const CONNECT_LUA: &str = concat!(
    lua_helpers!(),
    r#"
local base, inst = ARGV[1], ARGV[2]
local live = base .. 'live:' .. inst
local missing = 0
if redis.call('EXISTS', live) == 0 then
  redis.call('SET', live, '1', 'PX', ARGV[7])
  missing = 1
end
redis.call('SADD', base .. 'instances', inst)
local first = add_conn(base, inst, ARGV[3], ARGV[4], ARGV[5], ARGV[6], true)
return {first and 1 or 0, missing}
"#
);

/// ARGV: base, instance, then (room, conn) pairs of that instance.
/// Returns a flat list of (room, user, name) for the users who left.
const FORGET_LUA: &str = concat!(
    lua_helpers!(),
    r#"
local base, inst = ARGV[1], ARGV[2]
local left = {}
for i = 3, #ARGV - 1, 2 do
  local room, conn = ARGV[i], ARGV[i + 1]
  redis.call('SREM', base .. 'inst:' .. inst, room .. ' ' .. conn)
  local user, name = remove_conn(base, room, conn)
  if user then
    table.insert(left, room)
    table.insert(left, user)
    table.insert(left, name)
  end
end
return left
"#
);

/// ARGV: base, instance, then (room, conn, user, name) per connection.
/// Names already there are kept: they may be newer than this mirror's.
const RESTORE_LUA: &str = concat!(
    lua_helpers!(),
    r#"
local base, inst = ARGV[1], ARGV[2]
redis.call('SADD', base .. 'instances', inst)
for i = 3, #ARGV - 3, 4 do
  add_conn(base, inst, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], false)
end
return 0
"#
);

/// KEYS: the liveness key, the instance set. ARGV: ttl (ms), instance.
/// Returns 1 when the liveness key was missing (expired or lost).
const KEEP_ALIVE_LUA: &str = r#"
local was = redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'GET')
redis.call('SADD', KEYS[2], ARGV[2])
if was then
  return 0
end
return 1
"#;

/// ARGV: base, budget (connections). Forgets the connections of instances
/// whose liveness key is gone, about `budget` of them per call. Returns
/// `{more, left}`: whether dead connections remain, and a flat list of
/// (room, user, name) for the users who thereby left.
const SWEEP_LUA: &str = concat!(
    lua_helpers!(),
    r#"
local base = ARGV[1]
local budget = tonumber(ARGV[2])
local registry = base .. 'instances'
local left = {}
local more = 0
for _, inst in ipairs(redis.call('SMEMBERS', registry)) do
  if budget <= 0 then
    more = 1
    break
  end
  if redis.call('EXISTS', base .. 'live:' .. inst) == 0 then
    local held = base .. 'inst:' .. inst
    local page = redis.call('SSCAN', held, '0', 'COUNT', budget)[2]
    for _, entry in ipairs(page) do
      redis.call('SREM', held, entry)
      local space = string.find(entry, ' ', 1, true)
      if space then
        local room = string.sub(entry, 1, space - 1)
        local user, name = remove_conn(base, room, string.sub(entry, space + 1))
        if user then
          table.insert(left, room)
          table.insert(left, user)
          table.insert(left, name)
        end
      end
      budget = budget - 1
    end
    if redis.call('EXISTS', held) == 0 then
      redis.call('SREM', registry, inst)
    else
      more = 1
    end
  end
end
return {more, left}
"#
);

struct Scripts {
    connect: Script,
    forget: Script,
    restore: Script,
    keep_alive: Script,
    sweep: Script,
}

pub struct RedisPresence {
    redis: RedisConn,
    /// `{prefix}pr:`, the start of every key; the scripts derive the rest.
    base: String,
    instance_id: String,
    ttl: Duration,
    scripts: Scripts,
    /// This instance's live connections, room → connection key → user: what
    /// a restore writes back. Updated whatever Redis answers. A std mutex,
    /// held only for map operations.
    mirror: Mutex<HashMap<RoomId, HashMap<String, User>>>,
    /// Shared by connect and disconnect across their Redis call, exclusive
    /// during a restore: a restore must not write back a connection that a
    /// disconnect is forgetting meanwhile, nor count one twice with a
    /// concurrent connect (which would then miss its "first").
    gate: RwLock<()>,
    /// Set when Redis may have lost or dropped this instance's connections
    /// without `keep_alive` seeing its key missing: the next one restores.
    restore_due: AtomicBool,
    /// Disconnections Redis did not confirm, (room, connection key); the
    /// next sweep retries them and reports the users who left.
    unconfirmed: Mutex<Vec<(RoomId, String)>>,
}

impl RedisPresence {
    /// `ttl` is how long this instance counts as alive after each
    /// `keep_alive`; call `keep_alive` and `sweep` every `ttl / 3` or so.
    pub fn new(redis: RedisConn, prefix: String, instance_id: String, ttl: Duration) -> Self {
        Self {
            redis,
            base: format!("{prefix}pr:"),
            instance_id,
            ttl,
            scripts: Scripts {
                connect: Script::new(CONNECT_LUA),
                forget: Script::new(FORGET_LUA),
                restore: Script::new(RESTORE_LUA),
                keep_alive: Script::new(KEEP_ALIVE_LUA),
                sweep: Script::new(SWEEP_LUA),
            },
            mirror: Mutex::new(HashMap::new()),
            gate: RwLock::new(()),
            restore_due: AtomicBool::new(false),
            unconfirmed: Mutex::new(Vec::new()),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Runs a Redis call within `limit`; any failure is `Unavailable`.
    async fn within<T>(
        limit: Duration,
        call: impl Future<Output = anyhow::Result<T>>,
    ) -> Result<T, ChatError> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(ChatError::Unavailable),
            Err(_) => Err(ChatError::Unavailable(anyhow!(
                "Redis did not answer within {limit:?}"
            ))),
        }
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        limit: Duration,
    ) -> Result<T, ChatError> {
        Self::within(limit, async {
            let mut conn = self.redis.clone();
            Ok(invocation.invoke_async(&mut conn).await?)
        })
        .await
    }

    /// Writes this instance's mirror back to Redis.
    async fn restore(&self) -> Result<(), ChatError> {
        let _exclusive = self.gate.write().await;
        // The clone is the price of not holding the mirror's lock across the
        // awaits below; restores are rare.
        let snapshot: Vec<(RoomId, String, User)> = {
            let mirror = self.mirror.lock().expect("presence mirror lock");
            mirror
                .iter()
                .flat_map(|(room, conns)| {
                    conns
                        .iter()
                        .map(|(conn, user)| (room.clone(), conn.clone(), user.clone()))
                })
                .collect()
        };
        for batch in snapshot.chunks(BATCH) {
            let mut invocation = self.scripts.restore.prepare_invoke();
            invocation.arg(&self.base).arg(&self.instance_id);
            for (room, conn, user) in batch {
                invocation
                    .arg(room.as_str())
                    .arg(conn)
                    .arg(user.id.as_str())
                    .arg(&user.name);
            }
            self.invoke::<i64>(&invocation, BATCH_TIMEOUT).await?;
        }
        if !snapshot.is_empty() {
            tracing::info!(
                connections = snapshot.len(),
                "wrote this instance's presence back to Redis"
            );
        }
        Ok(())
    }

    /// Retries the disconnections Redis did not confirm; those still failing
    /// wait for the next sweep.
    async fn retry_unconfirmed(&self, left: &mut Vec<(RoomId, User)>) {
        let pending = std::mem::take(&mut *self.unconfirmed.lock().expect("presence retry lock"));
        let mut failed = Vec::new();
        for batch in pending.chunks(BATCH) {
            let mut invocation = self.scripts.forget.prepare_invoke();
            invocation.arg(&self.base).arg(&self.instance_id);
            for (room, conn) in batch {
                invocation.arg(room.as_str()).arg(conn);
            }
            match self.invoke::<Vec<String>>(&invocation, BATCH_TIMEOUT).await {
                Ok(flat) => collect_left(flat, left),
                Err(err) => {
                    tracing::debug!(error = %err, "disconnections still unconfirmed");
                    failed.extend_from_slice(batch);
                }
            }
        }
        if !failed.is_empty() {
            self.remember_unconfirmed(failed);
        }
    }

    fn remember_unconfirmed(&self, entries: Vec<(RoomId, String)>) {
        let mut unconfirmed = self.unconfirmed.lock().expect("presence retry lock");
        let room = MAX_UNCONFIRMED.saturating_sub(unconfirmed.len());
        if entries.len() > room {
            tracing::warn!(
                dropped = entries.len() - room,
                "too many unconfirmed disconnections; their connections stay listed until this instance stops"
            );
        }
        unconfirmed.extend(entries.into_iter().take(room));
    }
}

/// Turns a script's flat (room, user, name) list into departures. Entries
/// that no longer parse are skipped rather than failing the whole batch,
/// whose other departures are already final in Redis.
fn collect_left(flat: Vec<String>, left: &mut Vec<(RoomId, User)>) {
    let mut items = flat.into_iter();
    while let (Some(room), Some(user), Some(name)) = (items.next(), items.next(), items.next()) {
        match (RoomId::parse(&room), UserId::parse(&user)) {
            (Ok(room), Ok(id)) => left.push((room, User { id, name })),
            _ => tracing::warn!(%room, %user, "skipping a malformed presence entry"),
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connect(
        &self,
        room: &RoomId,
        user: &User,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError> {
        let _shared = self.gate.read().await;
        self.mirror
            .lock()
            .expect("presence mirror lock")
            .entry(room.clone())
            .or_default()
            .insert(conn.to_owned(), user.clone());
        let mut invocation = self.scripts.connect.prepare_invoke();
        invocation
            .arg(&self.base)
            .arg(&self.instance_id)
            .arg(room.as_str())
            .arg(conn)
            .arg(user.id.as_str())
            .arg(&user.name)
            .arg(self.ttl_ms());
        match self.invoke::<(i64, i64)>(&invocation, CALL_TIMEOUT).await {
            Ok((first, instance_was_missing)) => {
                if instance_was_missing == 1 {
                    self.restore_due.store(true, Ordering::Relaxed);
                }
                Ok(first == 1)
            }
            Err(err) => {
                // The script may have run anyway, or Redis may be restarting:
                // the next keep-alive re-syncs from the mirror.
                self.restore_due.store(true, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// `user` is not needed: the connection's own entry says whose it is.
    async fn disconnect(
        &self,
        room: &RoomId,
        _user: &UserId,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError> {
        let _shared = self.gate.read().await;
        {
            let mut mirror = self.mirror.lock().expect("presence mirror lock");
            if let Some(conns) = mirror.get_mut(room) {
                conns.remove(conn);
                if conns.is_empty() {
                    mirror.remove(room);
                }
            }
        }
        let mut invocation = self.scripts.forget.prepare_invoke();
        invocation
            .arg(&self.base)
            .arg(&self.instance_id)
            .arg(room.as_str())
            .arg(conn);
        match self.invoke::<Vec<String>>(&invocation, CALL_TIMEOUT).await {
            Ok(left) => Ok(!left.is_empty()),
            Err(err) => {
                self.remember_unconfirmed(vec![(room.clone(), conn.to_owned())]);
                Err(err)
            }
        }
    }

    async fn list(&self, room: &RoomId) -> Result<Vec<User>, ChatError> {
        let key = format!("{}room:{room}:names", self.base);
        // A BTreeMap sorts by id as the trait asks (UserId orders as its
        // string does).
        let names: BTreeMap<String, String> = Self::within(CALL_TIMEOUT, async {
            let mut conn = self.redis.clone();
            Ok(redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await?)
        })
        .await?;
        names
            .into_iter()
            .map(|(id, name)| {
                let id = UserId::parse(&id).map_err(|_| {
                    ChatError::Internal(anyhow!("presence holds a malformed user id {id:?}"))
                })?;
                Ok(User { id, name })
            })
            .collect()
    }

    async fn keep_alive(&self) -> Result<(), ChatError> {
        let mut invocation = self
            .scripts
            .keep_alive
            .key(format!("{}live:{}", self.base, self.instance_id));
        invocation
            .key(format!("{}instances", self.base))
            .arg(self.ttl_ms())
            .arg(&self.instance_id);
        let was_missing = match self.invoke::<i64>(&invocation, CALL_TIMEOUT).await {
            Ok(missing) => missing == 1,
            Err(err) => {
                // If the key was set but the answer lost, the next call would
                // not see it missing: restore then anyway.
                self.restore_due.store(true, Ordering::Relaxed);
                return Err(err);
            }
        };
        let due = self.restore_due.swap(false, Ordering::Relaxed);
        if was_missing || due {
            if let Err(err) = self.restore().await {
                self.restore_due.store(true, Ordering::Relaxed);
                return Err(err);
            }
        }
        Ok(())
    }

    async fn sweep(&self) -> Result<Vec<(RoomId, User)>, ChatError> {
        let mut left = Vec::new();
        self.retry_unconfirmed(&mut left).await;
        for _ in 0..MAX_SWEEP_BATCHES {
            let mut invocation = self.scripts.sweep.prepare_invoke();
            invocation.arg(&self.base).arg(BATCH);
            match self
                .invoke::<(i64, Vec<String>)>(&invocation, BATCH_TIMEOUT)
                .await
            {
                Ok((more, flat)) => {
                    collect_left(flat, &mut left);
                    if more == 0 {
                        break;
                    }
                }
                // Departures already collected are final in Redis: report
                // them; the failure will show again on the next sweep.
                Err(err) if !left.is_empty() => {
                    tracing::warn!(error = %err, "presence sweep stopped early");
                    break;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(left)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const TTL: Duration = Duration::from_millis(300);

    use crate::testing::{key_prefix as test_prefix, redis_at, redis_connection};

    /// One "pod": its own connection and instance id, sharing the prefix.
    async fn instance(prefix: &str, id: &str) -> RedisPresence {
        RedisPresence::new(
            redis_connection().await,
            prefix.to_owned(),
            id.to_owned(),
            TTL,
        )
    }

    fn room(id: &str) -> RoomId {
        RoomId::parse(id).expect("room id")
    }

    fn user(id: &str, name: &str) -> User {
        User {
            id: UserId::parse(id).expect("user id"),
            name: name.to_owned(),
        }
    }

    async fn ids(presence: &RedisPresence, room: &RoomId) -> Vec<String> {
        presence
            .list(room)
            .await
            .expect("list")
            .into_iter()
            .map(|u| u.id.to_string())
            .collect()
    }

    /// Deletes this test's keys only (other tests share the server), as a
    /// Redis restart would.
    async fn wipe(prefix: &str) {
        let mut conn = redis_connection().await;
        let mut cursor = 0_u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("UNLINK");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    /// Keeps `presence` alive until `until`, as its instance's timer would.
    async fn keep_alive_until(presence: &RedisPresence, until: tokio::time::Instant) {
        while tokio::time::Instant::now() < until {
            presence.keep_alive().await.expect("keep_alive");
            tokio::time::sleep(TTL / 3).await;
        }
    }

    #[tokio::test]
    async fn first_and_last_connections_count_across_instances() {
        let prefix = test_prefix();
        let (a, b) = (instance(&prefix, "a").await, instance(&prefix, "b").await);
        let r = room("lobby");
        let alice = user("alice", "Alice");
        assert!(a.connect(&r, &alice, "a:1").await.expect("connect"));
        assert!(!b.connect(&r, &alice, "b:1").await.expect("connect"));
        assert!(!a.connect(&r, &alice, "a:2").await.expect("connect"));
        assert!(
            !a.disconnect(&r, &alice.id, "a:1")
                .await
                .expect("disconnect")
        );
        assert!(
            !b.disconnect(&r, &alice.id, "b:1")
                .await
                .expect("disconnect")
        );
        assert_eq!(ids(&b, &r).await, ["alice"]);
        assert!(
            a.disconnect(&r, &alice.id, "a:2")
                .await
                .expect("disconnect")
        );
        assert!(ids(&a, &r).await.is_empty());
        // Forgetting an unknown or already forgotten connection is no leave.
        assert!(
            !a.disconnect(&r, &alice.id, "a:2")
                .await
                .expect("disconnect")
        );
        assert!(
            !b.disconnect(&r, &alice.id, "b:9")
                .await
                .expect("disconnect")
        );
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn list_gives_distinct_users_by_id_with_their_latest_name() {
        let prefix = test_prefix();
        let (a, b) = (instance(&prefix, "a").await, instance(&prefix, "b").await);
        let (lobby, other) = (room("lobby"), room("other"));
        a.connect(&lobby, &user("zed", "Zed"), "a:1")
            .await
            .expect("connect");
        a.connect(&lobby, &user("alice", "Alice"), "a:2")
            .await
            .expect("connect");
        b.connect(&lobby, &user("alice", "Alice B."), "b:1")
            .await
            .expect("connect");
        b.connect(&other, &user("bob", "Bob"), "b:2")
            .await
            .expect("connect");
        assert_eq!(
            a.list(&lobby).await.expect("list"),
            [user("alice", "Alice B."), user("zed", "Zed")]
        );
        assert_eq!(b.list(&other).await.expect("list"), [user("bob", "Bob")]);
        assert!(a.list(&room("empty")).await.expect("list").is_empty());
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn concurrent_connections_from_two_instances_make_one_join_and_one_leave() {
        let prefix = test_prefix();
        let (a, b) = (instance(&prefix, "a").await, instance(&prefix, "b").await);
        let alice = user("alice", "Alice");
        for round in 0..20 {
            let r = room(&format!("room-{round}"));
            let (ja, jb) = tokio::join!(a.connect(&r, &alice, "a:1"), b.connect(&r, &alice, "b:1"));
            let joins = [ja.expect("connect"), jb.expect("connect")];
            assert_eq!(joins.iter().filter(|j| **j).count(), 1, "round {round}");
            let (la, lb) = tokio::join!(
                a.disconnect(&r, &alice.id, "a:1"),
                b.disconnect(&r, &alice.id, "b:1")
            );
            let leaves = [la.expect("disconnect"), lb.expect("disconnect")];
            assert_eq!(leaves.iter().filter(|l| **l).count(), 1, "round {round}");
        }
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn a_dead_instance_is_swept_once_and_only_its_last_connections_leave() {
        let prefix = test_prefix();
        let dead = instance(&prefix, "dead").await;
        let b = instance(&prefix, "b").await;
        let c = instance(&prefix, "c").await;
        let (lobby, side) = (room("lobby"), room("side"));
        for p in [&dead, &b, &c] {
            p.keep_alive().await.expect("keep_alive");
        }
        dead.connect(&lobby, &user("alice", "Alice"), "dead:1")
            .await
            .expect("connect");
        dead.connect(&lobby, &user("dave", "Dave"), "dead:2")
            .await
            .expect("connect");
        dead.connect(&side, &user("carol", "Carol"), "dead:3")
            .await
            .expect("connect");
        b.connect(&lobby, &user("alice", "Alice"), "b:1")
            .await
            .expect("connect");
        b.connect(&lobby, &user("bob", "Bob"), "b:2")
            .await
            .expect("connect");

        // `dead` stops keeping alive (SIGKILL); the others go on past its ttl.
        let until = tokio::time::Instant::now() + TTL + TTL / 2;
        tokio::join!(keep_alive_until(&b, until), keep_alive_until(&c, until));

        let (from_b, from_c) = tokio::join!(b.sweep(), c.sweep());
        let mut left: Vec<(String, String)> = from_b
            .expect("sweep")
            .into_iter()
            .chain(from_c.expect("sweep"))
            .map(|(r, u)| (r.to_string(), u.id.to_string()))
            .collect();
        left.sort();
        // Alice still has b's connection; each departure is reported once.
        assert_eq!(
            left,
            [
                ("lobby".to_owned(), "dave".to_owned()),
                ("side".to_owned(), "carol".to_owned())
            ]
        );
        assert_eq!(ids(&b, &lobby).await, ["alice", "bob"]);
        assert!(ids(&b, &side).await.is_empty());
        assert!(b.sweep().await.expect("sweep").is_empty());
        // Alice's remaining connection still counts: its end is a leave.
        assert!(
            b.disconnect(&lobby, &user("alice", "").id, "b:1")
                .await
                .expect("disconnect")
        );
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn keep_alive_restores_this_instances_connections_after_redis_loses_them() {
        let prefix = test_prefix();
        let (a, b) = (instance(&prefix, "a").await, instance(&prefix, "b").await);
        let r = room("lobby");
        a.keep_alive().await.expect("keep_alive");
        b.keep_alive().await.expect("keep_alive");
        a.connect(&r, &user("alice", "Alice"), "a:1")
            .await
            .expect("connect");
        a.connect(&r, &user("bob", "Bob"), "a:2")
            .await
            .expect("connect");
        b.connect(&r, &user("alice", "Alice"), "b:1")
            .await
            .expect("connect");
        a.disconnect(&r, &user("bob", "").id, "a:2")
            .await
            .expect("disconnect");

        wipe(&prefix).await; // a Redis restart without persistence
        assert!(ids(&a, &r).await.is_empty());

        a.keep_alive().await.expect("keep_alive");
        b.keep_alive().await.expect("keep_alive");
        assert_eq!(ids(&a, &r).await, ["alice"]);
        // Counts came back exact: one leave, after both connections end.
        assert!(
            !a.disconnect(&r, &user("alice", "").id, "a:1")
                .await
                .expect("disconnect")
        );
        assert!(
            b.disconnect(&r, &user("alice", "").id, "b:1")
                .await
                .expect("disconnect")
        );
        // A restore is idempotent: nothing doubles on the next keep-alive.
        a.connect(&r, &user("carol", "Carol"), "a:3")
            .await
            .expect("connect");
        a.keep_alive().await.expect("keep_alive");
        assert!(
            a.disconnect(&r, &user("carol", "").id, "a:3")
                .await
                .expect("disconnect")
        );
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn an_instance_swept_while_paused_comes_back_on_its_next_keep_alive() {
        let prefix = test_prefix();
        let (paused, b) = (
            instance(&prefix, "paused").await,
            instance(&prefix, "b").await,
        );
        let r = room("lobby");
        paused.keep_alive().await.expect("keep_alive");
        paused
            .connect(&r, &user("alice", "Alice"), "paused:1")
            .await
            .expect("connect");

        tokio::time::sleep(TTL + TTL / 2).await;
        let left = b.sweep().await.expect("sweep");
        assert_eq!(left.len(), 1);
        assert!(ids(&b, &r).await.is_empty());

        paused.keep_alive().await.expect("keep_alive");
        assert_eq!(ids(&b, &r).await, ["alice"]);
        assert!(
            paused
                .disconnect(&r, &user("alice", "").id, "paused:1")
                .await
                .expect("disconnect")
        );
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn connections_made_before_the_first_keep_alive_are_not_swept() {
        let prefix = test_prefix();
        let (fresh, b) = (
            instance(&prefix, "fresh").await,
            instance(&prefix, "b").await,
        );
        let r = room("lobby");
        fresh
            .connect(&r, &user("alice", "Alice"), "fresh:1")
            .await
            .expect("connect");
        assert!(b.sweep().await.expect("sweep").is_empty());
        assert_eq!(ids(&b, &r).await, ["alice"]);
        wipe(&prefix).await;
    }

    #[tokio::test]
    async fn redis_failures_are_unavailable_and_quick() {
        // Nothing listens on port 1.
        let presence = RedisPresence::new(
            redis_at("redis://127.0.0.1:1"),
            test_prefix(),
            "a".into(),
            TTL,
        );
        let r = room("lobby");
        let alice = user("alice", "Alice");
        let started = std::time::Instant::now();
        let unavailable = |res: Result<_, ChatError>| matches!(res, Err(ChatError::Unavailable(_)));
        assert!(unavailable(
            presence.connect(&r, &alice, "a:1").await.map(|_| ())
        ));
        assert!(unavailable(presence.list(&r).await.map(|_| ())));
        assert!(unavailable(presence.keep_alive().await));
        assert!(unavailable(
            presence.disconnect(&r, &alice.id, "a:1").await.map(|_| ())
        ));
        assert!(unavailable(presence.sweep().await.map(|_| ())));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // The failed disconnection waits for a retry.
        assert_eq!(presence.unconfirmed.lock().expect("lock").len(), 1);
    }
}
