//! The HBONE client: connections pooled and multiplexed per [`PoolKey`] (source identity,
//! destination address, expected destination identity), at most `max_streams` streams each,
//! closed when idle, declared dead when an HTTP/2 PING goes unanswered.

use ambient_common::sync::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{authority, client_builder, forwarded_header, FORWARDED};
use crate::config::PoolConfig;
use crate::identity::{Identity, SecretError, SecretManager};
use crate::proxy::{SocketError, SocketFactory};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no certificate for the source identity")]
    Certificate(#[source] SecretError),
    #[error("TCP connection to the peer ztunnel failed (is port 15008 reachable?)")]
    Dial(#[source] SocketError),
    #[error(
        "TLS handshake with {addr} failed (wrong identity, untrusted or expired certificate?)"
    )]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("CONNECT to {authority} failed on the HBONE connection")]
    Request {
        authority: String,
        #[source]
        source: h2::Error,
    },
    #[error("CONNECT to {authority} answered {status}")]
    Status {
        authority: String,
        status: StatusCode,
    },
    #[error("cannot build the CONNECT request for {0}")]
    Build(String),
}

/// What the pool's connections are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PoolKey {
    pub src: Identity,
    pub dst: SocketAddr,
    pub expected: Identity,
}

/// A byte stream the HTTP/2 client runs on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type DialFuture<'a> = Pin<Box<dyn Future<Output = Result<Box<dyn Io>, PoolError>> + Send + 'a>>;

/// Opens the transport of a new pooled connection (TLS in production; plain in tests).
pub trait Dialer: Send + Sync + 'static {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a>;
}

/// The production dialer: marked TCP, then mutual TLS presenting the source identity's
/// certificate and expecting the destination identity.
pub struct TlsDialer {
    pub certs: Arc<SecretManager>,
    pub sockets: SocketFactory,
}

impl Dialer for TlsDialer {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> DialFuture<'a> {
        Box::pin(async move {
            let held = self
                .certs
                .fetch(&key.src)
                .await
                .map_err(PoolError::Certificate)?;
            let cfg = held
                .client_for(&key.expected)
                .map_err(PoolError::Certificate)?;
            let tcp = self
                .sockets
                .connect(key.dst)
                .await
                .map_err(PoolError::Dial)?;
            let mut tls = tokio::time::timeout(
                self.sockets.connect_timeout,
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(ServerName::IpAddress(key.dst.ip().into()), tcp),
            )
            .await
            .map_err(|_| PoolError::Tls {
                addr: key.dst,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ),
            })?
            .map_err(|source| PoolError::Tls {
                addr: key.dst,
                source,
            })?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
            Ok(Box::new(tls) as Box<dyn Io>)
        })
    }
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    dead: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Conn {
    /// Takes a stream slot if fewer than `max` (and than the server allows) are in use.
    fn try_lease(&self, max: usize) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        // A server advertising a lower SETTINGS_MAX_CONCURRENT_STREAMS gets no more than that
        // per connection: further streams open another connection rather than wait in h2.
        let max = max.min(self.send.current_max_send_streams());
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn retire(&self) {
        self.dead.store(true, Ordering::Release);
    }

    fn close(&self) {
        self.dead.store(true, Ordering::Release);
        if let Some(tx) = self.kill.lock().take() {
            let _ = tx.send(());
        }
    }
}

enum Retry {
    Yes(PoolError),
    No(PoolError),
}

/// A stream's hold on its connection; releases the slot on drop.
pub struct Lease(Arc<Conn>);

impl Drop for Lease {
    fn drop(&mut self) {
        *self.0.last_used.lock() = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open HBONE stream.
pub struct HboneStream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// The pooled connection it rides on (for logs).
    pub connection_id: u64,
    _lease: Lease,
}

impl HboneStream {
    /// The stream's halves and its hold on the pooled connection (keep it as long as the
    /// stream is used).
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Lease) {
        (self.send, self.recv, self._lease)
    }
}

/// Numbers for `/config_dump` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub key: PoolKey,
    pub connections: usize,
    pub streams: usize,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    creating: Arc<tokio::sync::Mutex<()>>,
}

pub struct Pool {
    cfg: PoolConfig,
    dialer: Box<dyn Dialer>,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(cfg: PoolConfig, dialer: Box<dyn Dialer>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            dialer,
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn lease_existing(&self, key: &PoolKey) -> Result<Lease, Arc<tokio::sync::Mutex<()>>> {
        let mut entries = self.entries.lock();
        let entry = entries.entry(key.clone()).or_default();
        entry.conns.retain(|c| !c.dead.load(Ordering::Acquire));
        for c in &entry.conns {
            if c.try_lease(self.cfg.max_streams) {
                return Ok(Lease(c.clone()));
            }
        }
        Err(entry.creating.clone())
    }

    async fn lease(&self, key: &PoolKey) -> Result<Lease, PoolError> {
        let creating = match self.lease_existing(key) {
            Ok(l) => return Ok(l),
            Err(c) => c,
        };
        // One dial per key at a time; others wait and then share the new connection.
        let _g = creating.lock().await;
        if let Ok(l) = self.lease_existing(key) {
            return Ok(l);
        }
        let conn = self.open(key).await?;
        conn.active.store(1, Ordering::Release);
        let mut entries = self.entries.lock();
        entries
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn.clone());
        Ok(Lease(conn))
    }

    async fn open(&self, key: &PoolKey) -> Result<Arc<Conn>, PoolError> {
        let io = self.dialer.dial(key).await?;
        let (send, mut connection) =
            client_builder()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|source| PoolError::Handshake {
                    addr: key.dst,
                    source,
                })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dead = Arc::new(AtomicBool::new(false));
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let ping = connection.ping_pong();
        {
            let dead = dead.clone();
            let dst = key.dst;
            tokio::spawn(async move {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            tracing::debug!(%dst, conn = id, error = %e, "HBONE connection ended");
                        }
                    }
                    _ = kill_rx => tracing::debug!(%dst, conn = id, "HBONE connection closed"),
                }
                dead.store(true, Ordering::Release);
            });
        }
        let conn = Arc::new(Conn {
            id,
            send,
            active: AtomicUsize::new(0),
            dead: dead.clone(),
            last_used: Mutex::new(Instant::now()),
            kill: Mutex::new(Some(kill_tx)),
        });
        if let Some(mut ping) = ping {
            let weak = Arc::downgrade(&conn);
            let (interval, timeout) = (self.cfg.ping_interval, self.cfg.ping_timeout);
            let dst = key.dst;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(conn) = weak.upgrade() else { return };
                    if conn.dead.load(Ordering::Acquire) {
                        return;
                    }
                    drop(conn);
                    let ok = matches!(
                        tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await,
                        Ok(Ok(_))
                    );
                    if !ok {
                        tracing::warn!(%dst, conn = id, "HBONE connection did not answer PING; closing it");
                        if let Some(conn) = weak.upgrade() {
                            conn.close();
                        }
                        return;
                    }
                }
            });
        }
        tracing::debug!(dst = %key.dst, conn = id, expected = %key.expected, "HBONE connection opened");
        Ok(conn)
    }

    /// Opens a CONNECT stream to `target` through a pooled connection for `key`.
    /// `forwarded_for` is the original client's address, sent as Istio's ztunnel sends it
    /// (`forwarded: for="10.0.0.1:51812"`, `for="[fd00::1]:51812"`: RFC 7239, quoted).
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        forwarded_for: Option<SocketAddr>,
    ) -> Result<HboneStream, PoolError> {
        let auth = authority(target);
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .uri(auth.as_str());
        if let Some(client) = forwarded_for {
            b = b.header(FORWARDED, forwarded_header(client));
        }
        let req = b.body(()).map_err(|_| PoolError::Build(auth.clone()))?;
        // A pooled connection may be going away (peer draining: GOAWAY, or closed); a request
        // refused before any byte was carried is retried once on a fresh connection.
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Boxed: leasing may dial (TLS and HTTP/2 handshakes); its state must not stay in
            // the caller's task for the connection's life.
            let lease = Box::pin(self.lease(key)).await?;
            match Box::pin(Self::open_stream(&lease, req.clone(), &auth)).await {
                Ok((send, recv)) => {
                    return Ok(HboneStream {
                        send,
                        recv,
                        connection_id: lease.0.id,
                        _lease: lease,
                    })
                }
                Err(Retry::Yes(e)) if attempt < 3 => {
                    tracing::debug!(error = %e, conn = lease.0.id, "HBONE connection unusable; retrying on a new one");
                    // No new streams on it; streams already on it finish undisturbed.
                    lease.0.retire();
                }
                Err(Retry::Yes(e)) | Err(Retry::No(e)) => return Err(e),
            }
        }
    }

    async fn open_stream(
        lease: &Lease,
        req: Request<()>,
        auth: &str,
    ) -> Result<(SendStream<Bytes>, RecvStream), Retry> {
        let err = |source: h2::Error| {
            let retry = source.is_go_away()
                || source.is_io()
                || source.reason() == Some(h2::Reason::REFUSED_STREAM);
            let e = PoolError::Request {
                authority: auth.to_owned(),
                source,
            };
            if retry {
                Retry::Yes(e)
            } else {
                Retry::No(e)
            }
        };
        let mut send = lease.0.send.clone().ready().await.map_err(err)?;
        let (resp, stream) = send.send_request(req, false).map_err(err)?;
        let resp = resp.await.map_err(err)?;
        if resp.status() != StatusCode::OK {
            return Err(Retry::No(PoolError::Status {
                authority: auth.to_owned(),
                status: resp.status(),
            }));
        }
        Ok((stream, resp.into_body()))
    }

    /// Closes connections idle longer than the idle timeout and forgets dead ones.
    pub fn evict_idle(&self) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        for entry in entries.values_mut() {
            entry.conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.last_used.lock()) >= self.cfg.idle_timeout;
                if idle {
                    c.close();
                }
                !idle && !c.dead.load(Ordering::Acquire)
            });
        }
        entries.retain(|_, e| !e.conns.is_empty() || Arc::strong_count(&e.creating) > 1);
    }

    /// Runs [`Pool::evict_idle`] periodically until the pool is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every =
            (self.cfg.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(p) => p.evict_idle(),
                    None => return,
                }
            }
        });
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        let entries = self.entries.lock();
        entries
            .iter()
            .filter(|(_, e)| !e.conns.is_empty())
            .map(|(k, e)| PoolStats {
                key: k.clone(),
                connections: e.conns.len(),
                streams: e
                    .conns
                    .iter()
                    .map(|c| c.active.load(Ordering::Relaxed))
                    .sum(),
            })
            .collect()
    }
}
