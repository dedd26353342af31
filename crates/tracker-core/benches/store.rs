//! Store benchmark: heartbeats (single and batched), Redis memory per live
//! connection, and sweep cost as the number of tracked connections grows.
//!
//! Run: `cargo bench -p tracker-core --bench store` (add `-- --quick` for a
//! short run). It starts its own `redis-server` on a free loopback port, so
//! memory figures are not disturbed by anything else, and runs
//! `redis-benchmark` against that same server for the reference figures.
//! Every loop is bounded by a count or a deadline.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use tracker_core::{
    ClockOffset, ConnectionId, Limits, NewConnection, Protocol, RedisMode, RegisterOutcome,
    SessionId, Store, StoreConfig, UserAgent,
};

/// An 80-byte user agent, as the memory goal specifies.
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0 bench/1";

struct Settings {
    duration: Duration,
    memory_connections: usize,
    sweep_big: usize,
    scale_ops: usize,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            duration: Duration::from_secs(2),
            memory_connections: 20_000,
            sweep_big: 100_000,
            scale_ops: 500,
        }
    } else {
        Settings {
            duration: Duration::from_secs(5),
            memory_connections: 100_000,
            sweep_big: 1_000_000,
            scale_ops: 2_000,
        }
    };
    let server = RedisServer::start()?;
    println!(
        "# tracker-core store benchmark (redis-server on port {})",
        server.port
    );

    server.cli(&["config", "resetstat"])?;
    let zadd = redis_benchmark(server.port, &["-t", "zadd", "-c", "50"])?;
    let zadd_usec = server.cmdstat("zadd")?.usec_per_call();
    let zadd_p16 = redis_benchmark(server.port, &["-t", "zadd", "-c", "50", "-P", "16"])?;
    println!("redis-benchmark -t zadd -c 50:        {zadd:>12.0} ops/s   redis time {zadd_usec:.2} us/ZADD");
    println!("redis-benchmark -t zadd -c 50 -P 16:  {zadd_p16:>12.0} ops/s");

    let store = server.store(60).await?;
    let single = single_heartbeats(&store, settings.duration, &server).await?;
    let raw = raw_zadds(&store, &single.conns, settings.duration, &server).await?;
    println!(
        "store heartbeat, 50 tasks:            {:>12.0} ops/s   p50 {:.2} ms  p99 {:.2} ms   ({:.2}x zadd)",
        single.rate.rate,
        single.rate.p50_ms,
        single.rate.p99_ms,
        single.rate.rate / zadd
    );
    println!(
        "  redis time per heartbeat:           {:>12.2} us        ({:.2}x redis-benchmark's ZADD, {:.2}x the ZADD it runs; {:.1} heartbeats a script call)",
        single.usec_per_heartbeat,
        single.usec_per_heartbeat / zadd_usec,
        single.usec_per_heartbeat / single.inner_zadd_usec,
        single.per_call
    );
    println!(
        "raw ZADD on the same connection sets, 50 tasks: {:>8.0} ops/s   redis time {:.2} us/ZADD   (heartbeat: {:.2}x its redis time)",
        raw.0,
        raw.1,
        single.usec_per_heartbeat / raw.1
    );
    // One connection a session, and ten (as the API's batch benchmark has
    // them): a batch checks the connections of one session together.
    for per_session in [1, 10] {
        let batched = batch_heartbeats(&store, settings.duration, &server, per_session).await?;
        println!(
            "store heartbeat_batch 10k, {per_session:>2} a session, 4 tasks: {:>9.0} pairs/s p50 {:.2} ms  p99 {:.2} ms   ({:.2}x zadd -P 16)",
            batched.rate,
            batched.p50_ms,
            batched.p99_ms,
            batched.rate / zadd_p16
        );
    }

    println!("one session of n connections, one call at a time (mean per call):");
    let one = session_scale(&server, 1, settings.scale_ops).await?;
    let many = session_scale(&server, 10_000, settings.scale_ops).await?;
    for (i, what) in ["register", "heartbeat", "session view"].iter().enumerate() {
        println!(
            "  {what:<13} n=1: {:>7.1} us   n=10,000: {:>7.1} us   ({:.2}x)",
            one[i],
            many[i],
            many[i] / one[i]
        );
    }
    println!(
        "  redis time per session view (a watch's read on a change): n=1: {:.1} us   n=10,000: {:.1} us",
        one[3], many[3]
    );
    println!(
        "  redis time per state read (a watch's read every interval): n=1: {:.1} us   n=10,000: {:.1} us",
        one[4], many[4]
    );

    for per_session in [1, 4] {
        let bytes =
            memory_per_connection(&server, settings.memory_connections, per_session).await?;
        println!(
            "redis memory per live connection ({per_session}/session, {} conns): {bytes:.0} bytes",
            settings.memory_connections
        );
        if per_session == 1 {
            memory_by_family(&server, settings.memory_connections).await?;
        }
    }
    let ended = memory_per_ended_id(&server, settings.memory_connections).await?;
    println!("redis memory per ended connection's id, kept for the id retention: {ended:.0} bytes");

    let small = sweep_cost(&server, 10_000, 0).await?;
    let big = sweep_cost(&server, 10_000, settings.sweep_big).await?;
    println!(
        "sweep 10,000 expired among 10,000 tracked:     {:>8.1} ms",
        small.as_secs_f64() * 1e3
    );
    println!(
        "sweep 10,000 expired among {:>9} tracked:   {:>8.1} ms   ({:.2}x)",
        settings.sweep_big + 10_000,
        big.as_secs_f64() * 1e3,
        big.as_secs_f64() / small.as_secs_f64()
    );
    Ok(())
}

struct Rate {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Registers `n` connections, `per_session` to a session, 64 at a time.
async fn register_many(
    store: &Store,
    n: usize,
    per_session: usize,
    tag: &str,
) -> Result<Vec<(SessionId, ConnectionId)>> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let chunk: Vec<_> = (i..(i + 64).min(n))
            .map(|k| {
                let session: SessionId = format!("{tag}-session-{}", k / per_session).parse()?;
                Ok(NewConnection {
                    session_id: session,
                    connection_id: ConnectionId::new_random(),
                    user_id: format!("user-{}", k % 1000).parse()?,
                    protocol: Protocol::Websocket,
                    client_ip: Some("10.20.30.40".parse()?),
                    user_agent: Some(UserAgent::truncated(UA)),
                })
            })
            .collect::<Result<_>>()?;
        let results = join_all(chunk.iter().map(|c| store.register(c, Limits::default()))).await;
        for (c, r) in chunk.iter().zip(results) {
            match r.context("register")? {
                RegisterOutcome::Created(_) => {}
                other => bail!("registration refused: {other:?}"),
            }
            out.push((c.session_id.clone(), c.connection_id));
        }
        i += chunk.len();
    }
    Ok(out)
}

struct Single {
    conns: Vec<(SessionId, ConnectionId)>,
    rate: Rate,
    usec_per_heartbeat: f64,
    /// The ZADD each heartbeat runs inside its script: the same command
    /// under the same load.
    inner_zadd_usec: f64,
    per_call: f64,
}

async fn single_heartbeats(
    store: &Store,
    duration: Duration,
    server: &RedisServer,
) -> Result<Single> {
    let conns = register_many(store, 10_000, 1, "single").await?;
    server.cli(&["config", "resetstat"])?;
    let deadline = Instant::now() + duration;
    let tasks = (0..50).map(|t| {
        let store = store.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = t;
            while Instant::now() < deadline {
                let (s, c) = &conns[k % conns.len()];
                let start = Instant::now();
                if store.heartbeat(s, *c).await?.is_none() {
                    bail!("heartbeat of a live connection refused");
                }
                lat.push(start.elapsed());
                k += 50;
            }
            anyhow::Ok(lat)
        })
    });
    let mut lat = Vec::new();
    for t in join_all(tasks).await {
        lat.extend(t??);
    }
    let heartbeats = lat.len() as f64;
    let calls = server.cmdstat("evalsha")?;
    Ok(Single {
        conns,
        rate: summarize(lat, 1, duration),
        usec_per_heartbeat: calls.usec / heartbeats,
        inner_zadd_usec: server.cmdstat("zadd")?.usec_per_call(),
        per_call: heartbeats / calls.calls.max(1.0),
    })
}

/// Plain `ZADD`s shaped like the single heartbeats: 50 tasks over one
/// multiplexed connection, each setting the score of one of the same
/// connections in its session's connection set. The same command on the same
/// keys under the same concurrency, without the script, the clock and the
/// liveness check: the "raw ZADD" a heartbeat's Redis time is compared with,
/// next to `redis-benchmark`'s, which hits one hot key. Answers ops/s and the
/// server time per ZADD.
async fn raw_zadds(
    store: &Store,
    conns: &[(SessionId, ConnectionId)],
    duration: Duration,
    server: &RedisServer,
) -> Result<(f64, f64)> {
    let conn = server.connection().await?;
    let targets: Vec<(String, String)> = conns
        .iter()
        .map(|(s, c)| (store.keys().session_conns_key(s), c.to_string()))
        .collect();
    server.cli(&["config", "resetstat"])?;
    let start = Instant::now();
    let deadline = start + duration;
    let tasks = (0..50).map(|t| {
        let mut conn = conn.clone();
        let targets = targets.clone();
        tokio::spawn(async move {
            let (mut k, mut done) = (t, 0u64);
            while Instant::now() < deadline {
                let (key, member) = &targets[k % targets.len()];
                let _: i64 = redis::cmd("ZADD")
                    .arg(key)
                    .arg(1_000_000_000_000_i64 + k as i64)
                    .arg(member)
                    .query_async(&mut conn)
                    .await?;
                k += 50;
                done += 1;
            }
            anyhow::Ok(done)
        })
    });
    let mut done = 0;
    for t in join_all(tasks).await {
        done += t??;
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    Ok((rate, server.cmdstat("zadd")?.usec_per_call()))
}

/// Mean time of a register, a heartbeat and a session view on one session
/// already holding `size` connections of 1,000 users, one call at a time;
/// then the Redis time of one session view and of one state read (what a
/// WebSocket session watch reads when the state changed, and every interval).
async fn session_scale(server: &RedisServer, size: usize, ops: usize) -> Result<[f64; 5]> {
    server.flush()?;
    let store = server.store(60).await?;
    let conns = register_many(&store, size, size, "scale").await?;
    let session = conns[0].0.clone();
    let mean = |took: Duration| took.as_secs_f64() * 1e6 / ops as f64;

    let start = Instant::now();
    for k in 0..ops {
        let new = NewConnection {
            session_id: session.clone(),
            connection_id: ConnectionId::new_random(),
            user_id: format!("user-{}", k % 1000).parse()?,
            protocol: Protocol::Websocket,
            client_ip: Some("10.20.30.40".parse()?),
            user_agent: Some(UserAgent::truncated(UA)),
        };
        match store.register(&new, Limits::default()).await? {
            RegisterOutcome::Created(_) => {}
            other => bail!("registration refused: {other:?}"),
        }
    }
    let register = mean(start.elapsed());

    let start = Instant::now();
    for k in 0..ops {
        let (s, c) = &conns[k % conns.len()];
        if store.heartbeat(s, *c).await?.is_none() {
            bail!(
                "heartbeat of a live connection refused: {:?}",
                store.get_connection(*c).await?
            );
        }
    }
    let heartbeat = mean(start.elapsed());

    server.cli(&["config", "resetstat"])?;
    let start = Instant::now();
    for _ in 0..ops {
        store
            .session(&session)
            .await?
            .context("the session is known")?;
    }
    let view = mean(start.elapsed());
    let redis = server.cmdstat("evalsha")?.usec_per_call();

    server.cli(&["config", "resetstat"])?;
    for _ in 0..ops {
        store
            .session_state(&session)
            .await?
            .context("the session is known")?;
    }
    let state = server.cmdstat("evalsha")?.usec_per_call();
    Ok([register, heartbeat, view, redis, state])
}

async fn batch_heartbeats(
    store: &Store,
    duration: Duration,
    server: &RedisServer,
    per_session: usize,
) -> Result<Rate> {
    const BATCH: usize = 10_000;
    let tag = format!("batch{per_session}");
    let conns = register_many(store, 40_000, per_session, &tag).await?;
    server.cli(&["config", "resetstat"])?;
    let deadline = Instant::now() + duration;
    let tasks = (0..4).map(|t| {
        let store = store.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = t * BATCH;
            while Instant::now() < deadline {
                let start_idx = k % (conns.len() - BATCH);
                let start = Instant::now();
                let outcome = store
                    .heartbeat_batch(&conns[start_idx..start_idx + BATCH])
                    .await?;
                lat.push(start.elapsed());
                if !outcome.unknown.is_empty() {
                    bail!("{} heartbeats unknown", outcome.unknown.len());
                }
                k += 4 * BATCH;
            }
            Ok(lat)
        })
    });
    let mut lat = Vec::new();
    for t in join_all(tasks).await {
        lat.extend(t??);
    }
    let rate = summarize(lat, BATCH, duration);
    // Time spent inside Redis, to tell server cost from client cost.
    let calls = server.cmdstat("evalsha")?;
    let pairs = rate.rate * duration.as_secs_f64();
    println!(
        "  redis time per batched heartbeat, {per_session:>2} a session: {:>6.2} us",
        calls.usec / pairs.max(1.0)
    );
    Ok(rate)
}

fn summarize(mut lat: Vec<Duration>, per_call: usize, duration: Duration) -> Rate {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Rate {
        rate: (lat.len() * per_call) as f64 / duration.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

/// `used_memory` growth per connection, on an otherwise empty server.
async fn memory_per_connection(server: &RedisServer, n: usize, per_session: usize) -> Result<f64> {
    server.flush()?;
    let store = server.store(60).await?;
    let before = server.used_memory()?;
    register_many(&store, n, per_session, "mem").await?;
    let after = server.used_memory()?;
    Ok((after - before) as f64 / n as f64)
}

/// Where the memory of `n` connections (one a session, just registered by
/// [`memory_per_connection`]) sits, by kind of key: `MEMORY USAGE` of every
/// key, summed per key name with ids and numbers taken out. What the sum
/// misses is the key space's own bookkeeping (its hash table entries).
async fn memory_by_family(server: &RedisServer, n: usize) -> Result<()> {
    let mut conn = server.connection().await?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut families: std::collections::BTreeMap<String, (usize, i64)> = Default::default();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let sizes: Vec<Option<i64>> = pipe.query_async(&mut conn).await?;
        for (key, size) in chunk.iter().zip(sizes) {
            let entry = families.entry(key_family(key)).or_default();
            entry.0 += 1;
            entry.1 += size.unwrap_or(0);
        }
    }
    let mut total = 0;
    for (family, (count, bytes)) in families.iter().filter(|(_, (_, b))| *b > 0) {
        total += bytes;
        println!(
            "  {family:<28} {count:>7} keys  {:>6.1} bytes a connection",
            *bytes as f64 / n as f64
        );
    }
    println!(
        "  (sum {:.1} bytes a connection; the rest is the key space's own tables)",
        total as f64 / n as f64
    );
    Ok(())
}

/// A key's name with shard numbers, session names, ids and bucket numbers
/// replaced by what they stand for.
fn key_family(key: &str) -> String {
    key.split(':')
        .enumerate()
        .map(|(i, part)| {
            if part.starts_with('{') {
                let inner = part.trim_matches(|c| c == '{' || c == '}');
                let kind = inner.trim_end_matches(|c: char| c.is_ascii_digit());
                format!("{{{kind}n}}")
            } else if i > 2 && (part.contains('-') || part.chars().all(|c| c.is_ascii_digit())) {
                "*".to_owned()
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// `used_memory` growth per ended connection once archived: what its id's
/// entry costs for `TRACKER_CONNECTION_ID_RETENTION` (its session's metadata,
/// which expires within the hour, is forgotten first).
async fn memory_per_ended_id(server: &RedisServer, n: usize) -> Result<f64> {
    server.flush()?;
    let store = server.store(60).await?;
    let before = server.used_memory()?;
    let conns = register_many(&store, n, 1, "ended").await?;
    for chunk in conns.chunks(64) {
        for r in join_all(chunk.iter().map(|(s, c)| store.close(s, *c))).await {
            r?;
        }
    }
    for shard in store.keys().shards() {
        loop {
            let entries = store.outbox_read(shard, 1000).await?;
            if entries.is_empty() {
                break;
            }
            let records: Vec<_> = entries.iter().map(|e| e.record.clone()).collect();
            store.settle_archived(&records).await?;
            let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
            store.outbox_ack(shard, &ids).await?;
        }
    }
    let mut conn = server.connection().await?;
    for chunk in conns.chunks(1000) {
        let mut pipe = redis::pipe();
        for (session, _) in chunk {
            pipe.cmd("DEL")
                .arg(&store.keys().session_keys(session))
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    let after = server.used_memory()?;
    memory_by_family(server, n).await?;
    Ok((after - before) as f64 / n as f64)
}

/// Time to sweep 10,000 expired connections while `live` others stay tracked.
async fn sweep_cost(server: &RedisServer, expired: usize, live: usize) -> Result<Duration> {
    server.flush()?;
    let clock = ClockOffset::default();
    let store = server.store(60).await?.with_clock(clock.clone());
    register_many(&store, expired, 2, "old").await?;
    clock.advance(Duration::from_secs(61));
    register_many(&store, live, 2, "live").await?;
    let start = Instant::now();
    let mut swept = 0;
    for shard in store.keys().shards() {
        loop {
            let sweep = store.sweep_shard(shard, 1000).await?;
            swept += sweep.expired.len();
            if !sweep.more {
                break;
            }
        }
    }
    let took = start.elapsed();
    if swept != expired {
        bail!("swept {swept}, expected {expired}");
    }
    Ok(took)
}

/// One line of `INFO commandstats`.
#[derive(Debug, Default, Clone, Copy)]
struct CmdStat {
    calls: f64,
    usec: f64,
}

impl CmdStat {
    fn usec_per_call(self) -> f64 {
        self.usec / self.calls.max(1.0)
    }
}

/// A private redis-server on a free loopback port, stopped on drop.
struct RedisServer {
    port: u16,
    child: Child,
    _dir: TempDir,
}

impl RedisServer {
    fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = TempDir::new()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .spawn()
            .context("start redis-server (is it installed? scripts/services.sh installs it)")?;
        let server = Self {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if server.cli(&["ping"]).is_ok_and(|out| out.trim() == "PONG") {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("redis-server on port {port} did not answer within 5 s")
    }

    async fn store(&self, window_secs: u64) -> Result<Store> {
        let mut cfg = StoreConfig::new(
            vec![format!("redis://127.0.0.1:{}", self.port)],
            RedisMode::Standalone,
        );
        cfg.heartbeat_window = Duration::from_secs(window_secs);
        cfg.command_timeout = Duration::from_secs(10);
        Ok(Store::connect(&cfg).await?)
    }

    /// A plain client connection, for what the store does not do itself.
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn flush(&self) -> Result<()> {
        self.cli(&["flushall"])?;
        Ok(())
    }

    /// A command's calls and server time since the last `CONFIG RESETSTAT`.
    fn cmdstat(&self, command: &str) -> Result<CmdStat> {
        let info = self.cli(&["info", "commandstats"])?;
        let prefix = format!("cmdstat_{command}:");
        let Some(line) = info.lines().find_map(|l| l.trim().strip_prefix(&prefix)) else {
            return Ok(CmdStat::default());
        };
        let field = |name: &str| {
            line.split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("{name} missing from {line}"))
        };
        Ok(CmdStat {
            calls: field("calls")?,
            usec: field("usec")?,
        })
    }

    fn used_memory(&self) -> Result<i64> {
        let info = self.cli(&["info", "memory"])?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .context("used_memory missing from INFO")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-benchmark` requests per second for one test (its `-q` CSV output).
fn redis_benchmark(port: u16, args: &[&str]) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", "300000", "--csv"])
        .args(args)
        .output()
        .context("run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // CSV: "test","rps",...; the data line follows the header.
    text.lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find_map(|l| {
            l.split(',')
                .nth(1)
                .map(|v| v.trim_matches('"').parse::<f64>())
        })
        .transpose()?
        .context("no figure in redis-benchmark output")
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("tracker-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
