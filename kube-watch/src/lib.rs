//! The Kubernetes list/watch loop shared by the node agent and ztunnel.
//!
//! A [`Reflector`] runs one resource: list (paged) to get a complete view and a
//! `resourceVersion`, then watch from it (with bookmarks), following every event's version.
//! A watch that ends (server timeout, dropped connection) resumes from the last version seen;
//! `410 Gone` (compacted history, as an HTTP status or an `ERROR` event) relists from scratch,
//! and the relist is sent as [`Change::Relisted`], which *replaces* the consumer's view, so
//! objects deleted while disconnected disappear. Failures back off exponentially (capped),
//! reset by the next success.
//!
//! A resource that may not exist (a CRD not installed) can be marked
//! [`Reflector::absent_retry`]: a `404` on its list then counts as an empty, successful list
//! and the list is retried at that interval instead of backing off as an error.
//!
//! With the `test-support` feature, [`testing::FakeApi`] is an in-process API server speaking
//! the real protocol, for the users' tests.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::mpsc;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no in-cluster configuration (service account token and CA); outside a cluster pass --kubeconfig")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from a kubeconfig file, or from the in-cluster service account (token, CA and
/// `KUBERNETES_SERVICE_HOST`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => kube::Config::incluster().map_err(ClientError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// Exponential backoff between failed API calls.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// The running state of a [`Backoff`].
#[derive(Debug)]
pub struct BackoffState {
    cfg: Backoff,
    next: Duration,
}

impl BackoffState {
    pub fn new(cfg: Backoff) -> Self {
        Self {
            cfg,
            next: cfg.initial,
        }
    }
    pub fn reset(&mut self) {
        self.next = self.cfg.initial;
    }
    /// The ceiling of the next [`wait`](Self::wait)'s sleep.
    pub fn next_delay(&self) -> Duration {
        self.next
    }
    /// Sleeps between half the current delay and all of it, chosen at random, then doubles
    /// the delay. The random half spreads the nodes: after an API server restart every
    /// node's watch fails at the same moment, and without it they would all relist
    /// together, at every step of the backoff.
    pub async fn wait(&mut self) {
        let d = jittered(self.next, random_fraction());
        self.next = (self.next * 2).min(self.cfg.max);
        tokio::time::sleep(d).await;
    }
}

/// `delay` scaled into `[delay/2, delay]` by `fraction` (in `[0, 1)`).
pub fn jittered(delay: Duration, fraction: f64) -> Duration {
    delay / 2 + delay.mul_f64(fraction.clamp(0.0, 1.0) / 2.0)
}

/// A number in `[0, 1)` that differs between processes and calls: std's `RandomState` is
/// seeded from the OS per process (and stepped per instance), which is all jitter needs.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// One Kubernetes API call a process makes: (API group, resource, verb). Each process
/// lists its calls, its tests check that list against the requests its client really
/// made, and the install tests check the manifests' RBAC grants each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiCall {
    pub group: &'static str,
    pub resource: &'static str,
    pub verb: &'static str,
}

impl ApiCall {
    pub const fn new(group: &'static str, resource: &'static str, verb: &'static str) -> Self {
        Self {
            group,
            resource,
            verb,
        }
    }

    /// As owned strings, to compare with what [`testing::Request::api_call`] reads.
    pub fn owned(&self) -> (String, String, String) {
        (self.group.into(), self.resource.into(), self.verb.into())
    }
}

/// What a reflector reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// A complete list: replaces everything of this resource.
    Relisted(Vec<T>),
    Applied(T),
    Deleted(T),
}

/// Why a watch stopped.
enum WatchEnd {
    /// The stream ended or broke: resume from the last version.
    Resume,
    /// The version is too old (410): list again.
    Relist,
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Lists every object (following `continue` tokens); returns them and the list's version.
pub async fn list_all<K>(
    api: &kube::Api<K>,
    fields: Option<&str>,
    page: u32,
) -> Result<(Vec<K>, String), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(page);
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let list = api.list(&lp).await?;
        out.extend(list.items);
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => token = Some(c),
            None => {
                let rv = list.metadata.resource_version.unwrap_or_default();
                return Ok((out, rv));
            }
        }
    }
}

/// One resource's list/watch loop. `convert` keeps what the consumer needs of each object,
/// `wrap` tags the change for the consumer's channel.
pub struct Reflector<K, T, U> {
    pub api: kube::Api<K>,
    /// A field selector for list and watch.
    pub fields: Option<String>,
    /// For logs.
    pub what: &'static str,
    pub convert: fn(&K) -> T,
    pub wrap: fn(Change<T>) -> U,
    pub backoff: Backoff,
    /// Server-side watch timeout (seconds); the watch is then resumed.
    pub watch_timeout: u32,
    /// Page size of the lists.
    pub page_size: u32,
    /// `Some(interval)`: the resource may not be served (a CRD not installed); a 404 on its
    /// list is an empty list, retried every `interval`.
    pub absent_retry: Option<Duration>,
}

impl<K, T, U> Reflector<K, T, U>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Send + 'static,
    U: Send + 'static,
{
    pub fn new(
        api: kube::Api<K>,
        what: &'static str,
        convert: fn(&K) -> T,
        wrap: fn(Change<T>) -> U,
    ) -> Self {
        Self {
            api,
            fields: None,
            what,
            convert,
            wrap,
            backoff: Backoff::default(),
            watch_timeout: 290,
            page_size: 500,
            absent_retry: None,
        }
    }

    /// Runs until `tx`'s receiver is gone.
    pub async fn run(self, tx: mpsc::Sender<U>) {
        let mut backoff = BackoffState::new(self.backoff);
        let mut version: Option<String> = None;
        // Whether the last list found the resource absent (so an empty view is already sent).
        let mut absent = false;
        loop {
            if tx.is_closed() {
                return;
            }
            let rv = match version.clone() {
                Some(v) => v,
                None => match list_all(&self.api, self.fields.as_deref(), self.page_size).await {
                    Ok((items, rv)) => {
                        tracing::debug!(what = self.what, count = items.len(), %rv, "listed");
                        if absent {
                            tracing::info!(what = self.what, "resource is served now");
                            absent = false;
                        }
                        let items = items.iter().map(self.convert).collect();
                        if tx.send((self.wrap)(Change::Relisted(items))).await.is_err() {
                            return;
                        }
                        backoff.reset();
                        version = Some(rv.clone());
                        rv
                    }
                    Err(e) if is_status(&e, 404) && self.absent_retry.is_some() => {
                        if !absent {
                            tracing::info!(
                                what = self.what,
                                "resource not served (CRD not installed?); treating as empty"
                            );
                            if tx
                                .send((self.wrap)(Change::Relisted(Vec::new())))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            absent = true;
                        }
                        backoff.reset();
                        if let Some(every) = self.absent_retry {
                            tokio::select! {
                                _ = tokio::time::sleep(every) => {}
                                _ = tx.closed() => return,
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(what = self.what, error = %e, "list failed; retrying with backoff");
                        backoff.wait().await;
                        continue;
                    }
                },
            };
            match self.watch_from(&rv, &mut version, &tx, &mut backoff).await {
                Some(WatchEnd::Relist) => {
                    tracing::info!(what = self.what, %rv, "watch history expired (410 Gone) or resource gone; relisting");
                    version = None;
                }
                Some(WatchEnd::Resume) => {}
                None => return,
            }
        }
    }

    /// Watches from `rv`, updating `version` with every event. `None` when the receiver
    /// is gone.
    async fn watch_from(
        &self,
        rv: &str,
        version: &mut Option<String>,
        tx: &mpsc::Sender<U>,
        backoff: &mut BackoffState,
    ) -> Option<WatchEnd> {
        let mut wp = WatchParams::default().timeout(self.watch_timeout);
        if let Some(f) = &self.fields {
            wp = wp.fields(f);
        }
        let stream = match self.api.watch(&wp, rv).await {
            Ok(s) => s,
            Err(e) if is_status(&e, 410) => return Some(WatchEnd::Relist),
            // The CRD was removed: list again (which then sees it absent).
            Err(e) if is_status(&e, 404) && self.absent_retry.is_some() => {
                return Some(WatchEnd::Relist)
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "watch failed; retrying with backoff");
                backoff.wait().await;
                return Some(WatchEnd::Resume);
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut events = 0usize;
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => {
                    *version = o.meta().resource_version.clone().or(version.take());
                    Change::Applied((self.convert)(&o))
                }
                Ok(WatchEvent::Deleted(o)) => {
                    *version = o.meta().resource_version.clone().or(version.take());
                    Change::Deleted((self.convert)(&o))
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    *version = Some(b.metadata.resource_version);
                    events += 1;
                    continue;
                }
                Ok(WatchEvent::Error(s)) if s.code == 410 => return Some(WatchEnd::Relist),
                Ok(WatchEvent::Error(s)) => {
                    tracing::warn!(what = self.what, code = s.code, message = %s.message, "watch error event; resuming with backoff");
                    backoff.wait().await;
                    return Some(WatchEnd::Resume);
                }
                Err(e) => {
                    tracing::warn!(what = self.what, error = %e, "watch stream broke; resuming with backoff");
                    backoff.wait().await;
                    return Some(WatchEnd::Resume);
                }
            };
            events += 1;
            backoff.reset();
            if tx.send((self.wrap)(change)).await.is_err() {
                return None;
            }
        }
        if events == 0 {
            // A server that closes every watch at once must not make us spin.
            backoff.wait().await;
        }
        Some(WatchEnd::Resume)
    }
}

#[cfg(test)]
mod tests;
