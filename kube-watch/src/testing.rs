//! An in-process stand-in for the Kubernetes API server, speaking the real list/watch
//! protocol over HTTP/1.1 on loopback: JSON lists with `resourceVersion` and `limit`/
//! `continue` paging, chunked watch streams of ADDED/MODIFIED/DELETED/BOOKMARK events, `410
//! Gone` for compacted versions (as an ERROR event on watch, as a status on list), `404` for
//! resources marked not served (a CRD not installed), merge patches on `pods/status`. Tests
//! drive it (put, delete, bookmark, compact, drop watches, fail requests) and read back every
//! request the real client sent.
//!
//! Test support only (feature `test-support`): it panics on what a test should never send.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Waits until `f` is true, checking every 5 ms for up to 10 s, or panics naming `what`: how
/// a test waits for a watcher fed by this server to catch up.
pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Request {
    /// The RBAC (API group, resource, verb) this request needs, as the API server's
    /// authorizer reads it from the path, method and `watch` query.
    pub fn api_call(&self) -> (String, String, String) {
        let segs: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => (String::new(), rest.to_vec()),
            ["apis", g, _v, rest @ ..] => (g.to_string(), rest.to_vec()),
            _ => panic!("unexpected path {}", self.path),
        };
        let (resource, named) = match rest.as_slice() {
            [r] => (r.to_string(), false),
            ["namespaces", _, r] => (r.to_string(), false),
            [r, _] if *r != "namespaces" => (r.to_string(), true),
            ["namespaces", _] => ("namespaces".to_string(), true),
            ["namespaces", _, r, _] => (r.to_string(), true),
            ["namespaces", _, r, _, sub] => (format!("{r}/{sub}"), true),
            other => panic!("unexpected path {other:?}"),
        };
        let watch = self.query.get("watch").map(String::as_str) == Some("true");
        let verb = match (self.method.as_str(), named, watch) {
            ("GET", _, true) => "watch",
            ("GET", false, false) => "list",
            ("GET", true, false) => "get",
            ("PATCH", _, _) => "patch",
            ("PUT", _, _) => "update",
            ("POST", _, _) => "create",
            ("DELETE", _, _) => "delete",
            (m, _, _) => panic!("unexpected method {m}"),
        };
        (group, resource, verb.to_string())
    }
}

/// The RBAC check every process's client test makes: the requests the real client sent,
/// the process's declared [`ApiCall`](crate::ApiCall)s and the role that grants them name
/// the same calls: nothing is called undeclared or ungranted, nothing is granted unused.
pub fn check_rbac(role: &Value, declared: &[crate::ApiCall], requests: &[Request]) {
    let made: BTreeSet<_> = requests.iter().map(Request::api_call).collect();
    let declared: BTreeSet<_> = declared.iter().map(crate::ApiCall::owned).collect();
    assert_eq!(
        made, declared,
        "the declared calls are exactly the calls made"
    );
    assert_eq!(
        granted(role),
        made,
        "the role grants exactly the calls made"
    );
}

/// The (API group, resource, verb) triples one RBAC role grants: the `rules` of a Role or
/// ClusterRole, as parsed JSON.
pub fn granted(role: &Value) -> BTreeSet<(String, String, String)> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) -> object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    log: Vec<Event>,
    /// Versions below this are too old to watch from (410).
    compacted: u64,
    requests: Vec<Request>,
    fail_next: VecDeque<u16>,
    /// Resources answered with 404 (their CRD is not installed).
    absent: BTreeSet<&'static str>,
    /// Bearer tokens TokenReview knows: token -> (user info, the token's audiences).
    tokens: BTreeMap<String, (Value, Vec<String>)>,
}

/// One resource the fake serves.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub kind: &'static str,
    pub resource: &'static str,
    /// API group ("" for core).
    pub group: &'static str,
    pub version: &'static str,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every resource the fake serves.
pub const KINDS: &[Kind] = &[
    Kind {
        kind: "Pod",
        resource: "pods",
        group: "",
        version: "v1",
    },
    Kind {
        kind: "Namespace",
        resource: "namespaces",
        group: "",
        version: "v1",
    },
    Kind {
        kind: "Service",
        resource: "services",
        group: "",
        version: "v1",
    },
    Kind {
        kind: "EndpointSlice",
        resource: "endpointslices",
        group: "discovery.k8s.io",
        version: "v1",
    },
    Kind {
        kind: "AuthorizationPolicy",
        resource: "authorizationpolicies",
        group: "security.istio.io",
        version: "v1",
    },
    Kind {
        kind: "PeerAuthentication",
        resource: "peerauthentications",
        group: "security.istio.io",
        version: "v1",
    },
];

fn by_kind(kind: &str) -> &'static Kind {
    KINDS
        .iter()
        .find(|k| k.kind == kind)
        .unwrap_or_else(|| panic!("fake API knows no kind {kind}"))
}

fn by_resource(resource: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.resource == resource)
}

#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Bumped on every change, so open watches look at the log again.
    changed: watch::Sender<u64>,
    /// Bumped to cut every open watch connection abruptly.
    cut: watch::Sender<u64>,
}

fn resource_of(kind: &str) -> &'static str {
    by_kind(kind).resource
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(h, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn matches(obj: &Value, query: &BTreeMap<String, String>) -> bool {
    match query.get("fieldSelector") {
        None => true,
        Some(sel) => sel.split(',').all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            match k {
                "spec.nodeName" => obj["spec"]["nodeName"].as_str() == Some(v),
                "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
                other => panic!("fake API cannot select on {other}"),
            }
        }),
    }
}

impl FakeApi {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Serves HTTPS with `acceptor`'s certificate (plain HTTP with `None`).
    pub async fn start_with(acceptor: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = FakeApi {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
            changed: watch::channel(0).0,
            cut: watch::channel(0).0,
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = server.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(conn).await {
                                let _ = s.serve(tls).await;
                            }
                        }
                        None => {
                            let _ = s.serve(conn).await;
                        }
                    }
                });
            }
        });
        api
    }

    /// Makes TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`) accept `token`
    /// for `audiences`, as `user` (`{"username": ..., "uid": ..., "extra": {...}}`). As the real
    /// API server: a review asking for audiences the token lacks is not authenticated; the
    /// status carries the audiences that matched.
    pub fn add_token(&self, token: &str, user: Value, audiences: &[&str]) {
        self.state.lock().unwrap().tokens.insert(
            token.to_owned(),
            (user, audiences.iter().map(|a| (*a).to_owned()).collect()),
        );
    }

    fn review_token(&self, review: &Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let st = self.state.lock().unwrap();
        let status = match st.tokens.get(token) {
            None => json!({ "authenticated": false, "error": "invalid bearer token" }),
            Some((user, auds)) => {
                let matched: Vec<&String> = if wanted.is_empty() {
                    auds.iter().collect()
                } else {
                    wanted.iter().filter(|w| auds.contains(w)).collect()
                };
                if matched.is_empty() {
                    json!({
                        "authenticated": false,
                        "error": "token audiences are invalid for the target audiences",
                    })
                } else {
                    json!({ "authenticated": true, "user": user, "audiences": matched })
                }
            }
        };
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": review["spec"],
            "status": status,
        })
    }

    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, a bearer token), for tests of
    /// the daemons' `--kubeconfig` flag.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n\
             users:\n- name: u\n  user:\n    token: abc\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }

    fn record(&self, st: &mut State, resource: &'static str, kind: &'static str, object: Value) {
        st.log.push(Event {
            rv: st.rv,
            resource,
            kind,
            object,
        });
        self.changed.send_modify(|g| *g += 1);
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its resourceVersion.
    pub fn put(&self, mut obj: Value) -> u64 {
        let resource = resource_of(obj["kind"].as_str().unwrap());
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}-{}", st.rv));
        }
        let key = (resource, ns, name);
        let kind = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        let rv = st.rv;
        self.record(&mut st, resource, kind, obj);
        rv
    }

    pub fn get(&self, resource: &'static str, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(resource, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn delete(&self, resource: &'static str, ns: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let mut obj = st
            .objects
            .remove(&(resource, ns.to_owned(), name.to_owned()))
            .expect("delete of a missing object");
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, resource, "DELETED", obj);
    }

    /// A BOOKMARK at the current version for watchers of `resource`.
    pub fn bookmark(&self, resource: &'static str) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let k = by_resource(resource).expect("bookmark for a known resource");
        let obj = json!({"kind": k.kind, "apiVersion": k.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
        let rv = st.rv;
        self.record(&mut st, resource, "BOOKMARK", obj);
        rv
    }

    /// Forgets history: watching from any version up to now answers 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv + 1;
    }

    /// Cuts every open watch connection without ending the chunked stream.
    pub fn cut_watches(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// The next `n` requests are answered with `code`.
    pub fn fail_next(&self, code: u16, n: usize) {
        let mut st = self.state.lock().unwrap();
        st.fail_next.extend(std::iter::repeat_n(code, n));
    }

    /// Serves `resource` (true) or answers 404 for it (false), as when its CRD is installed
    /// or not. Open watches of it are cut when it disappears.
    pub fn set_served(&self, resource: &'static str, served: bool) {
        {
            let mut st = self.state.lock().unwrap();
            if served {
                st.absent.remove(resource);
            } else {
                st.absent.insert(resource);
            }
        }
        if !served {
            self.cut_watches();
        }
    }

    /// Empties the store and its history (keeping the version counter), so a test can
    /// measure what its client holds without the server's copy.
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        st.objects = BTreeMap::new();
        st.log = Vec::new();
        st.requests = Vec::new();
        st.compacted = st.rv + 1;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: S) -> std::io::Result<()> {
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let mut length = 0usize;
        let mut authorization = None;
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).await?;
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("authorization") {
                    authorization = Some(v.trim().to_owned());
                }
            }
        }
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await?;
        let (path, q) = target.split_once('?').unwrap_or((&target, ""));
        let query: BTreeMap<String, String> = q
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (decode(k), decode(v))
            })
            .collect();
        let req = Request {
            method: method.clone(),
            path: path.to_owned(),
            query: query.clone(),
            authorization,
        };
        let fail = {
            let mut st = self.state.lock().unwrap();
            st.requests.push(req);
            st.fail_next.pop_front()
        };
        let mut conn = conn.into_inner();
        if let Some(code) = fail {
            return respond(
                &mut conn,
                code,
                &status(code, "InternalError", "injected failure"),
            )
            .await;
        }
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let collection = match segs.as_slice() {
            ["api", v, r] => by_resource(r).filter(|k| k.group.is_empty() && k.version == *v),
            ["apis", g, v, r] => by_resource(r).filter(|k| k.group == *g && k.version == *v),
            _ => None,
        };
        if let (Some(k), "GET") = (collection, method.as_str()) {
            if self.state.lock().unwrap().absent.contains(k.resource) {
                return respond(
                    &mut conn,
                    404,
                    &status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                )
                .await;
            }
            return self.list_or_watch(&mut conn, k.resource, &query).await;
        }
        match (method.as_str(), segs.as_slice()) {
            ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
                let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                let answer = self.review_token(&review);
                respond(&mut conn, 201, &answer).await
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                let Some(mut pod) = self.get("pods", ns, name) else {
                    return respond(&mut conn, 404, &status(404, "NotFound", "pod not found"))
                        .await;
                };
                if let Some(ann) = patch["metadata"]["annotations"].as_object() {
                    for (k, v) in ann {
                        if v.is_null() {
                            if let Some(m) = pod["metadata"]["annotations"].as_object_mut() {
                                m.remove(k);
                            }
                        } else {
                            pod["metadata"]["annotations"][k] = v.clone();
                        }
                    }
                }
                self.put(pod);
                let pod = self.get("pods", ns, name).unwrap();
                respond(&mut conn, 200, &pod).await
            }
            _ => respond(&mut conn, 404, &status(404, "NotFound", "no such path")).await,
        }
    }

    async fn list_or_watch<S: AsyncWrite + Unpin>(
        &self,
        conn: &mut S,
        resource: &'static str,
        query: &BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        if query.get("watch").map(String::as_str) == Some("true") {
            return self.watch(conn, resource, query).await;
        }
        let (code, body) = self.list_page(resource, query);
        respond(conn, code, &body).await
    }

    fn list_page(&self, resource: &'static str, query: &BTreeMap<String, String>) -> (u16, Value) {
        let st = self.state.lock().unwrap();
        // Paging: the continue token is "<rv>:<offset>", like the real one it pins a version.
        let (at, offset) = match query.get("continue") {
            Some(t) => {
                let (rv, off) = t.split_once(':').unwrap();
                (rv.parse::<u64>().unwrap(), off.parse::<usize>().unwrap())
            }
            None => (st.rv, 0),
        };
        if at < st.compacted && query.contains_key("continue") {
            return (
                410,
                status(410, "Expired", "The provided continue parameter is too old"),
            );
        }
        let all = || {
            st.objects
                .iter()
                .filter(|((r, _, _), o)| *r == resource && matches(o, query))
                .map(|(_, o)| o)
        };
        let limit = query
            .get("limit")
            .map(|l| l.parse::<usize>().unwrap())
            .unwrap_or(usize::MAX);
        let page: Vec<Value> = all().skip(offset).take(limit).cloned().collect();
        let mut meta = json!({"resourceVersion": at.to_string()});
        if offset + page.len() < all().count() {
            meta["continue"] = json!(format!("{at}:{}", offset + page.len()));
        }
        let k = by_resource(resource).expect("known resource");
        (
            200,
            json!({"kind": format!("{}List", k.kind), "apiVersion": k.api_version(), "metadata": meta, "items": page}),
        )
    }

    async fn watch<S: AsyncWrite + Unpin>(
        &self,
        conn: &mut S,
        resource: &'static str,
        query: &BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let too_old = self.state.lock().unwrap().compacted > from;
        if too_old {
            let ev = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            chunk(conn, &ev).await?;
            return conn.write_all(b"0\r\n\r\n").await;
        }
        let mut changed = self.changed.subscribe();
        let mut cut = self.cut.subscribe();
        let mut sent = from;
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let pending: Vec<Event> = {
                let st = self.state.lock().unwrap();
                st.log
                    .iter()
                    .filter(|e| e.rv > sent && e.resource == resource)
                    .filter(|e| e.kind != "BOOKMARK" || bookmarks)
                    .filter(|e| e.kind == "BOOKMARK" || matches(&e.object, query))
                    .cloned()
                    .collect()
            };
            for e in pending {
                sent = e.rv;
                chunk(conn, &json!({"type": e.kind, "object": e.object})).await?;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = cut.changed() => {
                    // Abrupt: no terminating chunk.
                    return conn.shutdown().await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return conn.write_all(b"0\r\n\r\n").await;
                }
            }
        }
    }
}

async fn chunk<S: AsyncWrite + Unpin>(conn: &mut S, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).unwrap();
    line.push(b'\n');
    conn.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    conn.write_all(&line).await?;
    conn.write_all(b"\r\n").await?;
    conn.flush().await
}

async fn respond<S: AsyncWrite + Unpin>(
    conn: &mut S,
    code: u16,
    body: &Value,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    conn.shutdown().await
}
