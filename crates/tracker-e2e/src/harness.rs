//! [`Harness`]: one run's world. It owns the fake Kubernetes API server (in this process), the
//! run's PostgreSQL database, a random Redis key prefix and Kubernetes namespace, and the child
//! processes: `tracker-api` and `tracker-reaper` replicas, each with its own log file in the
//! run directory. Children are killed when the harness is dropped; [`Harness::shutdown`] stops
//! them with SIGTERM and cleans up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fake_kube::{FakeKube, Verb};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::client::{token, ApiClient, Endpoints};
use crate::db::TestDatabase;
use crate::metrics;
use crate::nats_server::NatsServer;
use crate::process::{free_port, Binaries, ChildProcess};
use crate::proxy::Proxy;
use crate::settings::{humantime, Services, Timing};
use crate::{Error, Result};

/// How the API replicas check callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `TRACKER_AUTH=jwt`; the harness signs a `service` token with [`JWT_SECRET`].
    Jwt,
    /// `TRACKER_AUTH=disabled`.
    Disabled,
}

/// HS256 key the API replicas get in JWT mode.
pub const JWT_SECRET: &str = "tracker-e2e-secret-not-for-production";
/// `sub` of the harness's service token.
pub const SERVICE_SUBJECT: &str = "e2e-proxy";
/// Name of the reapers' Lease.
pub const LEASE_NAME: &str = "tracker-reaper";

/// The Redis the processes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// The shared Redis Cluster of [`Services::cluster_urls`], `TRACKER_REDIS_MODE=cluster`.
    Cluster,
    /// One standalone server (a run's private `redis-server`), `TRACKER_REDIS_MODE=standalone`.
    Standalone(String),
}

/// What a run starts.
#[derive(Debug, Clone)]
pub struct HarnessOptions {
    pub apis: usize,
    pub reapers: usize,
    pub timing: Timing,
    pub auth: Auth,
    /// Give the reapers a `TRACKER_DATABASE_URL` through a [`Proxy`] that scenarios can cut.
    pub reaper_database_via_proxy: bool,
    /// `RUST_LOG` of the children.
    pub rust_log: String,
    pub services: Services,
    /// Where Redis is (default: the shared cluster).
    pub redis: RedisTarget,
    /// `TRACKER_REDIS_TIMEOUT` of every process (`None`: the binaries' default, 2 s).
    pub redis_timeout: Option<Duration>,
    /// `TRACKER_KUBE_TIMEOUT` of the reapers (`None`: the binary's default, 5 s); the races
    /// scenario shortens it so that its slow Kubernetes answers outlast it.
    pub kube_timeout: Option<Duration>,
    /// Keep the run directory (logs) even after a clean shutdown.
    pub keep_run_dir: bool,
    /// Start a private `nats-server` with JetStream and give the reapers its
    /// `TRACKER_NATS_URL`: every hibernation and wake is published too.
    pub nats: bool,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        Self {
            apis: 2,
            reapers: 2,
            timing: Timing::default(),
            auth: Auth::Jwt,
            reaper_database_via_proxy: false,
            rust_log: "info".into(),
            services: Services::from_env(),
            redis: RedisTarget::Cluster,
            redis_timeout: None,
            kube_timeout: None,
            keep_run_dir: std::env::var_os("TRACKER_E2E_KEEP").is_some(),
            nats: false,
        }
    }
}

/// How long a starting process may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting a process whose port was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// The JetStream stream the reaper publishes session events to (docs/platforms.md).
const EVENTS_STREAM: &str = "TRACKER_SESSION_EVENTS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Reaper,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Reaper => "reaper",
        }
    }
}

/// One replica slot; a restart is a new incarnation in the same slot.
#[derive(Debug)]
struct Replica {
    role: Role,
    index: usize,
    incarnation: u32,
    /// The API listener (APIs only); kept across restarts when possible.
    listen: Option<SocketAddr>,
    metrics: SocketAddr,
    process: Option<ChildProcess>,
}

impl Replica {
    /// A slot on free loopback ports (an API gets a listener as well as its metrics port).
    fn new(role: Role, index: usize) -> Result<Self> {
        Ok(Self {
            role,
            index,
            incarnation: 0,
            listen: match role {
                Role::Api => Some(loopback(free_port()?)),
                Role::Reaper => None,
            },
            metrics: loopback(free_port()?),
            process: None,
        })
    }

    fn name(&self) -> String {
        format!("{}-{}", self.role.as_str(), self.index)
    }
}

/// A Session `spec.state` patch as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatePatch {
    pub session: String,
    /// `spec.state` in the patch body.
    pub state: String,
    pub at: DateTime<Utc>,
    /// The fake's answer: 2xx landed, 409 lost a resourceVersion race.
    pub status: u16,
    pub field_manager: Option<String>,
    pub content_type: Option<String>,
}

impl StatePatch {
    pub fn landed(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How a child ended at [`Harness::shutdown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub process: String,
    pub status: String,
    /// Exited by itself within the grace period after SIGTERM, with success.
    pub clean: bool,
}

/// A running world; see the module doc.
#[derive(Debug)]
pub struct Harness {
    opts: HarnessOptions,
    run_dir: PathBuf,
    bins: Binaries,
    fake: FakeKube,
    kubeconfig: PathBuf,
    namespace: String,
    prefix: String,
    db: Option<TestDatabase>,
    proxy: Option<Proxy>,
    endpoints: Endpoints,
    client: ApiClient,
    probe: reqwest::Client,
    apis: Vec<Replica>,
    reapers: Vec<Replica>,
    nats: Option<NatsServer>,
    finished: bool,
}

/// One message of the session events stream, as a NATS consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PublishedEvent {
    pub subject: String,
    pub event_id: String,
    pub session_id: String,
}

impl Harness {
    /// Starts everything and waits until every process is ready and one reaper leads.
    pub async fn start(opts: HarnessOptions) -> Result<Self> {
        let bins = Binaries::locate()?;
        check_redis(&opts).await?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let run_dir = create_run_dir(&run[..12])?;
        let fake = FakeKube::start().await?;
        let kubeconfig = run_dir.join("kubeconfig");
        fake.write_kubeconfig(&kubeconfig)?;
        let db = TestDatabase::create(&opts.services.database_url).await?;
        let proxy = if opts.reaper_database_via_proxy {
            Some(database_proxy(&db).await?)
        } else {
            None
        };
        let token = match opts.auth {
            Auth::Jwt => Some(token(JWT_SECRET, SERVICE_SUBJECT, &["service"])?),
            Auth::Disabled => None,
        };
        let apis = (0..opts.apis)
            .map(|index| Replica::new(Role::Api, index))
            .collect::<Result<Vec<_>>>()?;
        let reapers = (0..opts.reapers)
            .map(|index| Replica::new(Role::Reaper, index))
            .collect::<Result<Vec<_>>>()?;
        let nats = if opts.nats {
            Some(NatsServer::start(&run_dir.join("nats")).await?)
        } else {
            None
        };
        let endpoints = Endpoints::new(apis.iter().filter_map(|r| r.listen).collect());
        let client = ApiClient::new(endpoints.clone(), token)?;
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::http("build the probe client", e))?;
        let mut h = Self {
            namespace: format!("e2e-{}", &run[..8]),
            prefix: format!("e2e-{}", &run[..12]),
            opts,
            run_dir,
            bins,
            fake,
            kubeconfig,
            db: Some(db),
            proxy,
            endpoints,
            client,
            probe,
            apis,
            reapers,
            nats,
            finished: false,
        };
        h.start_processes().await?;
        Ok(h)
    }

    /// Spawns every replica, waits until each is ready, then until one reaper leads.
    async fn start_processes(&mut self) -> Result<()> {
        // Reapers first: they apply the migrations.
        for i in 0..self.reapers.len() {
            self.spawn(Role::Reaper, i)?;
        }
        for i in 0..self.apis.len() {
            self.spawn(Role::Api, i)?;
        }
        for i in 0..self.reapers.len() {
            self.wait_ready(Role::Reaper, i).await?;
        }
        for i in 0..self.apis.len() {
            self.wait_ready(Role::Api, i).await?;
        }
        if !self.reapers.is_empty() {
            self.wait_leader(self.opts.timing.lease_duration * 2 + Duration::from_secs(10))
                .await?;
        }
        Ok(())
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Keep the run directory after [`Harness::shutdown`] (a scenario found a problem).
    pub fn keep_run_dir(&mut self) {
        self.opts.keep_run_dir = true;
    }

    pub fn timing(&self) -> Timing {
        self.opts.timing
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// A client of every API replica (with the service token in JWT mode).
    pub fn client(&self) -> ApiClient {
        self.client.clone()
    }

    /// The fake Kubernetes API server.
    pub fn fake(&self) -> &FakeKube {
        &self.fake
    }

    /// Waits until the leading reaper's NATS outbox is empty: every session
    /// event queued so far is published.
    pub async fn wait_events_published(&self, timeout: Duration) -> Result<()> {
        crate::poll::until(
            timeout,
            Duration::from_millis(200),
            "the NATS outbox empty",
            || async {
                let leader = self.wait_leader(timeout).await?;
                let text = self.reaper_metrics(leader).await.unwrap_or_default();
                let backlog = metrics::value(&text, metrics::NATS_OUTBOX);
                Ok((backlog == Some(0.0)).then_some(()))
            },
        )
        .await
    }

    /// Every message of the session events stream (`TRACKER_SESSION_EVENTS`),
    /// oldest first; empty without NATS or before the reaper created it.
    pub async fn published_events(&self) -> Result<Vec<PublishedEvent>> {
        let Some(nats) = &self.nats else {
            return Ok(Vec::new());
        };
        let messages = crate::nats_server::read_stream(&nats.url(), EVENTS_STREAM).await?;
        messages
            .into_iter()
            .map(|m| {
                let payload: Value = serde_json::from_slice(&m.payload)
                    .map_err(|e| Error::Setup(format!("NATS: a message's payload: {e}")))?;
                let field = |k: &str| payload[k].as_str().unwrap_or_default().to_owned();
                Ok(PublishedEvent {
                    subject: m.subject,
                    event_id: field("event_id"),
                    session_id: field("session_id"),
                })
            })
            .collect()
    }

    pub fn db(&self) -> Result<&TestDatabase> {
        self.db
            .as_ref()
            .ok_or_else(|| Error::Setup("the database is gone".into()))
    }

    /// The PostgreSQL proxy of the reapers, if the options asked for one.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    pub fn api_count(&self) -> usize {
        self.apis.len()
    }

    pub fn reaper_count(&self) -> usize {
        self.reapers.len()
    }

    fn slot(&self, role: Role, i: usize) -> Result<&Replica> {
        match role {
            Role::Api => self.apis.get(i),
            Role::Reaper => self.reapers.get(i),
        }
        .ok_or_else(|| Error::Setup(format!("no {} replica {i}", role.as_str())))
    }

    fn slot_mut(&mut self, role: Role, i: usize) -> Result<&mut Replica> {
        match role {
            Role::Api => self.apis.get_mut(i),
            Role::Reaper => self.reapers.get_mut(i),
        }
        .ok_or_else(|| Error::Setup(format!("no {} replica {i}", role.as_str())))
    }

    fn common_env(&self) -> Vec<(String, String)> {
        let t = &self.opts.timing;
        let (redis_url, redis_mode) = match &self.opts.redis {
            RedisTarget::Cluster => (self.opts.services.cluster_urls.join(","), "cluster"),
            RedisTarget::Standalone(url) => (url.clone(), "standalone"),
        };
        let mut env: Vec<(String, String)> = [
            ("TRACKER_REDIS_URL", redis_url),
            ("TRACKER_REDIS_MODE", redis_mode.into()),
            ("TRACKER_KEY_PREFIX", self.prefix.clone()),
            ("TRACKER_HEARTBEAT_WINDOW", humantime(t.heartbeat_window)),
            ("TRACKER_LOG_FORMAT", "text".into()),
            ("RUST_LOG", self.opts.rust_log.clone()),
            ("RUST_BACKTRACE", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(timeout) = self.opts.redis_timeout {
            env.push(("TRACKER_REDIS_TIMEOUT".into(), humantime(timeout)));
        }
        env
    }

    fn env_for(&self, role: Role, i: usize) -> Result<Vec<(String, String)>> {
        let slot = self.slot(role, i)?;
        let db = self.db()?;
        let t = &self.opts.timing;
        let mut env = self.common_env();
        let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
        set("TRACKER_METRICS_LISTEN", slot.metrics.to_string());
        match role {
            Role::Api => {
                let listen = slot
                    .listen
                    .ok_or_else(|| Error::Setup("an API slot without a port".into()))?;
                set("TRACKER_LISTEN", listen.to_string());
                set(
                    "TRACKER_HEARTBEAT_INTERVAL",
                    humantime(t.heartbeat_interval),
                );
                set("TRACKER_DATABASE_URL", db.url().to_owned());
                set("TRACKER_SHUTDOWN_TIMEOUT", "5s".into());
                // The load puts thousands of connections on eight users; the
                // limits are not what these scenarios measure.
                set("TRACKER_MAX_CONNECTIONS_PER_SESSION", "0".into());
                set("TRACKER_MAX_CONNECTIONS_PER_USER", "0".into());
                match self.opts.auth {
                    Auth::Jwt => {
                        set("TRACKER_AUTH", "jwt".into());
                        set("TRACKER_JWT_SECRET", JWT_SECRET.into());
                    }
                    Auth::Disabled => set("TRACKER_AUTH", "disabled".into()),
                }
            }
            Role::Reaper => {
                let url = match &self.proxy {
                    Some(p) => db.url_via("127.0.0.1", p.addr().port()),
                    None => db.url().to_owned(),
                };
                set("TRACKER_DATABASE_URL", url);
                set("TRACKER_SWEEP_INTERVAL", humantime(t.sweep_interval));
                set("TRACKER_ELECTION", "kubernetes".into());
                set("TRACKER_PLATFORM", "kubernetes".into());
                set("TRACKER_NAMESPACE", self.namespace.clone());
                set("TRACKER_LEASE_NAME", LEASE_NAME.into());
                set("TRACKER_LEASE_DURATION", humantime(t.lease_duration));
                if let Some(timeout) = self.opts.kube_timeout {
                    set("TRACKER_KUBE_TIMEOUT", humantime(timeout));
                }
                if let Some(nats) = &self.nats {
                    set("TRACKER_NATS_URL", nats.url());
                }
                set("KUBECONFIG", self.kubeconfig.display().to_string());
                set("POD_NAME", format!("{}-{}", slot.name(), slot.incarnation));
            }
        }
        Ok(env)
    }

    fn spawn(&mut self, role: Role, i: usize) -> Result<()> {
        // A new incarnation first: its number is in the pod name and the log file name.
        self.slot_mut(role, i)?.incarnation += 1;
        let env = self.env_for(role, i)?;
        let program = match role {
            Role::Api => self.bins.api.clone(),
            Role::Reaper => self.bins.reaper.clone(),
        };
        let run_dir = self.run_dir.clone();
        let slot = self.slot_mut(role, i)?;
        let name = format!("{}.{}", slot.name(), slot.incarnation);
        let log = run_dir.join(format!("{name}.log"));
        slot.process = Some(ChildProcess::spawn(&name, &program, &env, &log)?);
        Ok(())
    }

    /// Polls `/readyz` of a replica; a child that died of a taken port is started again on
    /// new ports.
    async fn wait_ready(&mut self, role: Role, i: usize) -> Result<()> {
        for attempt in 1..=START_ATTEMPTS {
            match self.poll_ready(role, i).await {
                Err(Error::Exited { log, .. }) if attempt < START_ATTEMPTS && port_taken(&log) => {
                    let slot = self.slot_mut(role, i)?;
                    slot.metrics = loopback(free_port()?);
                    if let Some(listen) = slot.listen.as_mut() {
                        *listen = loopback(free_port()?);
                    }
                    if let Some(listen) = slot.listen {
                        self.endpoints.set(i, listen);
                    }
                    self.spawn(role, i)?;
                }
                other => return other,
            }
        }
        Err(Error::Setup(format!(
            "{} replica {i} could not bind a port",
            role.as_str()
        )))
    }

    async fn poll_ready(&mut self, role: Role, i: usize) -> Result<()> {
        let url = format!("http://{}/readyz", self.slot(role, i)?.metrics);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            {
                let slot = self.slot_mut(role, i)?;
                let process = slot
                    .process
                    .as_mut()
                    .ok_or_else(|| Error::Setup("no process in the slot".into()))?;
                process.check_running("it was ready")?;
            }
            if let Ok(r) = self.probe.get(&url).send().await {
                if r.status().is_success() {
                    return self.check_ops(role, i).await;
                }
            }
            if Instant::now() >= deadline {
                let slot = self.slot(role, i)?;
                let log = slot
                    .process
                    .as_ref()
                    .map(|p| p.log().display().to_string())
                    .unwrap_or_default();
                return Err(Error::Timeout {
                    what: format!("{} /readyz (log: {log})", slot.name()),
                    waited: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Once ready, `/healthz`, `/metrics` (and an API's `/openapi.json`) answer 200 on the
    /// metrics listener, and an API's `/healthz` on its own port too.
    async fn check_ops(&self, role: Role, i: usize) -> Result<()> {
        let slot = self.slot(role, i)?;
        let mut urls = vec![
            format!("http://{}/healthz", slot.metrics),
            format!("http://{}/metrics", slot.metrics),
        ];
        if let Some(listen) = slot.listen {
            urls.push(format!("http://{}/openapi.json", slot.metrics));
            urls.push(format!("http://{listen}/healthz"));
        }
        for url in urls {
            let r = self
                .probe
                .get(&url)
                .send()
                .await
                .map_err(|e| Error::http(format!("GET {url}"), e))?;
            if !r.status().is_success() {
                return Err(Error::Protocol(format!(
                    "{}: GET {url} answered {}",
                    slot.name(),
                    r.status()
                )));
            }
        }
        Ok(())
    }

    /// A reaper's `/metrics` text, or `None` if it is down or does not answer.
    pub async fn reaper_metrics(&self, i: usize) -> Option<String> {
        self.metrics_text(self.reapers.get(i)?).await
    }

    /// An API replica's `/metrics` text, or `None` if it is down or does not answer.
    pub async fn api_metrics(&self, i: usize) -> Option<String> {
        self.metrics_text(self.apis.get(i)?).await
    }

    async fn metrics_text(&self, slot: &Replica) -> Option<String> {
        slot.process.as_ref()?;
        let r = self
            .probe
            .get(format!("http://{}/metrics", slot.metrics))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }

    /// The metrics listener (`/readyz`, `/healthz`, `/metrics`) of API replica `i`.
    pub fn api_metrics_addr(&self, i: usize) -> Option<SocketAddr> {
        self.apis.get(i).map(|slot| slot.metrics)
    }

    /// `tracker_reaper_is_leader` of reaper `i`: `None` if it is down or has no such gauge.
    pub async fn is_leader(&self, i: usize) -> Option<bool> {
        let text = self.reaper_metrics(i).await?;
        metrics::value(&text, metrics::IS_LEADER).map(|v| v == 1.0)
    }

    /// Waits until exactly one running reaper reports itself leader; answers its index.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for i in 0..self.reapers.len() {
                if self.is_leader(i).await == Some(true) {
                    leaders.push(i);
                }
            }
            if let [one] = leaders[..] {
                return Ok(one);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("exactly one leading reaper (leaders now: {leaders:?})"),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POD_NAME` of reaper `i`'s current incarnation.
    pub fn reaper_pod_name(&self, i: usize) -> Option<String> {
        self.reapers.get(i).map(pod_name)
    }

    /// `spec.holderIdentity` of the reapers' Lease in the fake.
    pub fn lease_holder(&self) -> Option<String> {
        self.fake
            .lease(&self.namespace, LEASE_NAME)?
            .pointer("/spec/holderIdentity")?
            .as_str()
            .map(str::to_owned)
    }

    /// SIGKILL reaper `i` (no release, no flush) and reap it.
    pub async fn kill_reaper(&mut self, i: usize) -> Result<()> {
        self.kill(Role::Reaper, i).await
    }

    /// Starts a new incarnation of reaper `i` (a new `POD_NAME`) and waits for `/readyz`.
    pub async fn restart_reaper(&mut self, i: usize) -> Result<()> {
        self.restart(Role::Reaper, i).await
    }

    /// SIGKILL API replica `i`.
    pub async fn kill_api(&mut self, i: usize) -> Result<()> {
        self.kill(Role::Api, i).await
    }

    /// Starts API replica `i` again (same port if still free) and waits for `/readyz`.
    pub async fn restart_api(&mut self, i: usize) -> Result<()> {
        self.restart(Role::Api, i).await
    }

    /// SIGTERM API replica `i` and wait (bounded) for it to exit; answers how it ended.
    pub async fn terminate_api(&mut self, i: usize, grace: Duration) -> Result<Exit> {
        let slot = self.slot_mut(Role::Api, i)?;
        let Some(mut p) = slot.process.take() else {
            return Err(Error::Setup(format!("api-{i} is not running")));
        };
        let (status, in_time) = p.terminate(grace).await?;
        Ok(Exit {
            process: p.name().to_owned(),
            status: status.to_string(),
            clean: in_time && status.success(),
        })
    }

    async fn kill(&mut self, role: Role, i: usize) -> Result<()> {
        let slot = self.slot_mut(role, i)?;
        if let Some(mut p) = slot.process.take() {
            p.kill().await?;
        }
        Ok(())
    }

    async fn restart(&mut self, role: Role, i: usize) -> Result<()> {
        if self.slot(role, i)?.process.is_some() {
            self.kill(role, i).await?;
        }
        self.spawn(role, i)?;
        self.wait_ready(role, i).await
    }

    /// Fails if any child that should be running has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for slot in self.apis.iter_mut().chain(self.reapers.iter_mut()) {
            if let Some(p) = slot.process.as_mut() {
                p.check_running("the end of the scenario")?;
            }
        }
        Ok(())
    }

    /// Creates (or updates) a Session in the run's namespace, owned by `alice`, `running`.
    /// `idle_timeout` goes to `spec.idleTimeout` when given.
    pub fn create_session(&self, name: &str, idle_timeout: Option<&str>) -> Result<()> {
        let mut s = json!({
            "apiVersion": "stream.space/v1alpha1",
            "kind": "Session",
            "metadata": {"name": name},
            "spec": {"user": "alice", "state": "running", "image": "desktop:latest"},
        });
        if let Some(t) = idle_timeout {
            s["spec"]["idleTimeout"] = t.into();
        }
        self.fake.apply_session(&self.namespace, s)?;
        Ok(())
    }

    /// Waits until every session is mirrored (the API answers a state other than `unknown`).
    pub async fn wait_mirrored(&self, sessions: &[String], timeout: Duration) -> Result<()> {
        let client = self.client();
        let mut pending: Vec<&String> = sessions.iter().collect();
        let deadline = Instant::now() + timeout;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for s in pending {
                let a = client.session(0, s).await?;
                if a.status != 200 || a.body.get("state").and_then(Value::as_str) == Some("unknown")
                {
                    still.push(s);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{} sessions to be mirrored, e.g. {}",
                        pending.len(),
                        pending[0]
                    ),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Writes `value` as pretty JSON to `name` in the run directory (for a failure's
    /// post-mortem); answers the path.
    pub fn save_json(&self, name: &str, value: &impl serde::Serialize) -> Result<PathBuf> {
        let path = self.run_dir.join(name);
        let text = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Setup(format!("encode {name}: {e}")))?;
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        Ok(path)
    }

    /// Every `spec.state` patch the fake received for this run's Sessions, oldest first.
    pub fn state_patches(&self) -> Vec<StatePatch> {
        state_patches(&self.fake.requests(), &self.namespace)
    }

    /// Every change of this run's Sessions as the fake applied it, oldest first.
    pub fn session_changes(&self) -> Vec<fake_kube::SessionChange> {
        let mut changes = self.fake.session_changes();
        changes.retain(|c| c.namespace == self.namespace);
        changes
    }

    /// Waits until `connection_history` holds at least `expected` rows; answers the count.
    pub async fn wait_history(&self, expected: usize, timeout: Duration) -> Result<usize> {
        let db = self.db()?;
        let deadline = Instant::now() + timeout;
        loop {
            // Before the reaper has migrated, the table does not exist: that is "not yet".
            let n = db.history_count().await.unwrap_or(0);
            let n = usize::try_from(n).unwrap_or(0);
            if n >= expected {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every child with SIGTERM (bounded), drops the database, stops the fake, and
    /// removes the run directory unless asked to keep it. Answers how each child ended.
    pub async fn shutdown(mut self) -> Result<Vec<Exit>> {
        let mut exits = Vec::new();
        let grace = Duration::from_secs(15);
        let mut stopping = Vec::new();
        for slot in self.apis.iter_mut().chain(self.reapers.iter_mut()) {
            if let Some(p) = slot.process.take() {
                stopping.push(p);
            }
        }
        let results = futures::future::join_all(stopping.iter_mut().map(|p| async move {
            let r = p.terminate(grace).await;
            (p.name().to_owned(), r)
        }))
        .await;
        for (process, r) in results {
            let (status, clean) = match r {
                Ok((status, in_time)) => (status.to_string(), in_time && status.success()),
                Err(e) => (e.to_string(), false),
            };
            exits.push(Exit {
                process,
                status,
                clean,
            });
        }
        self.finished = true;
        if let Some(db) = self.db.take() {
            db.drop_database().await?;
        }
        let all_clean = exits.iter().all(|e| e.clean);
        if all_clean && !self.opts.keep_run_dir {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        } else {
            eprintln!("tracker-e2e: logs kept in {}", self.run_dir.display());
        }
        Ok(exits)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !self.finished {
            // Children die with their handles (kill_on_drop); the database drops itself.
            eprintln!(
                "tracker-e2e: run ended early; logs in {}",
                self.run_dir.display()
            );
        }
    }
}

/// The `spec.state` patches in `requests` for Sessions of `namespace`, oldest first.
pub fn state_patches(requests: &[fake_kube::RecordedRequest], namespace: &str) -> Vec<StatePatch> {
    let mut patches = requests
        .iter()
        .filter(|r| r.verb == Verb::Patch && r.namespace == namespace)
        .filter_map(|r| {
            Some(StatePatch {
                session: r.name.clone()?,
                state: r.body.pointer("/spec/state")?.as_str()?.to_owned(),
                at: r.received_at,
                status: r.status,
                field_manager: r.field_manager.clone(),
                content_type: r.content_type.clone(),
            })
        })
        .collect::<Vec<_>>();
    // Recorded when answered; sorted by when received.
    patches.sort_by_key(|p| p.at);
    patches
}

/// The election identity of a replica's current incarnation, as a Deployment's new pod would
/// get a new name.
fn pod_name(slot: &Replica) -> String {
    format!("{}-{}", slot.name(), slot.incarnation)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn port_taken(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.contains("Address already in use") || text.contains("address in use")
}

/// Fails early, naming the command to run, when the options want the shared Redis Cluster
/// and it is not there.
async fn check_redis(opts: &HarnessOptions) -> Result<()> {
    if opts.redis != RedisTarget::Cluster {
        return Ok(());
    }
    if opts.services.cluster_urls.is_empty() {
        return Err(Error::Setup(
            "TRACKER_TEST_CLUSTER_URLS names no node".into(),
        ));
    }
    check_cluster(&opts.services.cluster_urls).await
}

/// Creates `<tmp>/tracker-e2e/<short>`, where the children's logs go.
fn create_run_dir(short: &str) -> Result<PathBuf> {
    let run_dir = std::env::temp_dir().join("tracker-e2e").join(short);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| Error::io(format!("create {}", run_dir.display()), e))?;
    // Shown by the test harness on failure (and by the binary always).
    eprintln!("tracker-e2e: run dir {}", run_dir.display());
    Ok(run_dir)
}

/// A cuttable proxy in front of the run's PostgreSQL server.
async fn database_proxy(db: &TestDatabase) -> Result<Proxy> {
    let (host, port) = db.server();
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| Error::io(format!("resolve {host}:{port}"), e))?
        .next()
        .ok_or_else(|| Error::Setup(format!("{host}:{port} resolves to nothing")))?;
    Proxy::start(target).await
}

/// Fails with the command to run if no seed node of the cluster accepts a TCP connection.
async fn check_cluster(urls: &[String]) -> Result<()> {
    for url in urls {
        let hostport = url
            .trim_start_matches("redis://")
            .trim_start_matches("rediss://")
            .split('/')
            .next()
            .unwrap_or_default()
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        let connect = tokio::net::TcpStream::connect(hostport);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            return Ok(());
        }
    }
    Err(Error::Setup(format!(
        "the Redis Cluster ({}) is not reachable. Start it with `scripts/redis-cluster.sh start` \
         (scripts/test.sh does), or set TRACKER_TEST_CLUSTER_URLS.",
        urls.join(",")
    )))
}
