//! The issuer client against an in-process `IstioCertificateService` (tonic's generated server,
//! served over hyper HTTP/2 and tokio-rustls) that signs CSRs with a `ztunnel ca init` CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_common::ca_api::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambient_common::ca_api::{
    impersonated_identity, IstioCertificateRequest, IstioCertificateResponse,
};
use ambient_tests::netns::wait_until;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::codegen::Service;
use ztunnel::identity::{
    ca_init, CertificateProvider, Identity, IssuerClient, IssuerSettings, SecretManager,
};
use ztunnel::proxy::SocketFactory;

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    cluster_id: Option<String>,
    impersonated: Option<String>,
    validity: i64,
}

struct TestIssuer {
    ca: Issuer<'static, KeyPair>,
    /// The last chain element: the signing root and another (a root rotation).
    roots_pem: String,
    refuse: AtomicBool,
    /// Sign for this identity instead of the one asked for (a broken or hostile issuer).
    swap_identity: Mutex<Option<String>>,
    seen: Mutex<Vec<Seen>>,
}

/// The served side of a [`TestIssuer`] (the test keeps the other `Arc`).
struct Server(Arc<TestIssuer>);

#[tonic::async_trait]
impl IstioCertificateService for Server {
    async fn create_certificate(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let this = &self.0;
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let body = req.get_ref();
        this.seen.lock().unwrap().push(Seen {
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
            impersonated: impersonated_identity(body).map(str::to_owned),
            validity: body.validity_duration,
        });
        if this.refuse.load(Ordering::SeqCst) {
            return Err(tonic::Status::permission_denied(
                "node n1 runs no pod of this identity",
            ));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if let Some(other) = this.swap_identity.lock().unwrap().clone() {
            csr.params.subject_alt_names = vec![SanType::URI(other.try_into().unwrap())];
        }
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(1);
        csr.params.not_after = now + time::Duration::seconds(body.validity_duration);
        let leaf = csr
            .signed_by(&this.ca)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), this.roots_pem.clone()],
        }))
    }
}

fn self_signed(name: &str) -> (rcgen::Certificate, KeyPair, CertificateParams) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap(), key, params)
}

struct Lab {
    _dir: tempfile::TempDir,
    issuer: Arc<TestIssuer>,
    settings: IssuerSettings,
    roots: Vec<CertificateDer<'static>>,
    serving_root: CertificateDer<'static>,
}

/// Starts the issuer on 127.0.0.1:0; its serving certificate (IP SAN 127.0.0.1) chains to
/// the root written to `--ca-root`.
async fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let files = ca_init(&dir.path().join("ca"), "cluster.local", false).unwrap();
    let ca_pem = std::fs::read_to_string(&files.cert).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&files.key).unwrap()).unwrap();
    let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let (next_root, _, _) = self_signed("next root");
    let roots_pem = format!("{ca_pem}{}", next_root.pem());
    let roots = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();

    let (serving_ca, serving_key, serving_params) = self_signed("issuer serving root");
    let serving_issuer = Issuer::new(serving_params, serving_key);
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let server_cert = p.signed_by(&server_key, &serving_issuer).unwrap();
    let root_path = dir.path().join("issuer-root.pem");
    std::fs::write(&root_path, serving_ca.pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "node-token\n").unwrap();

    let issuer = Arc::new(TestIssuer {
        ca,
        roots_pem,
        refuse: AtomicBool::new(false),
        swap_identity: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(ztunnel::identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let addr = serve(Arc::new(tls), issuer.clone()).await;
    Lab {
        settings: IssuerSettings {
            address: format!("https://{addr}"),
            host: addr.ip().to_string(),
            port: addr.port(),
            server_name: addr.ip().to_string(),
            root: root_path,
            token,
            cluster_id: "Kubernetes".into(),
        },
        _dir: dir,
        issuer,
        roots,
        serving_root: serving_ca.der().clone(),
    }
}

async fn serve(tls: Arc<rustls::ServerConfig>, issuer: Arc<TestIssuer>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = IstioCertificateServiceServer::new(Server(issuer));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (tls, svc) = (tls.clone(), svc.clone());
            tokio::spawn(async move {
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let mut svc = svc.clone();
                    async move { svc.call(req).await }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn client(settings: &IssuerSettings) -> IssuerClient {
    IssuerClient::new(
        settings.clone(),
        "cluster.local",
        SocketFactory {
            mark: 0,
            connect_timeout: Duration::from_secs(5),
        },
        Duration::from_secs(5),
    )
    .unwrap()
}

fn metrics(m: &SecretManager) -> String {
    let mut registry = Registry::default();
    m.register_metrics(&mut registry);
    ztunnel::metrics::encode(&registry)
}

use ambient_common::error::chain;
use ambient_tests::inns::http_get;

/// How long an endpoint request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn issues_and_adopts_the_issuers_roots() {
    let lab = lab().await;
    let provider = Arc::new(client(&lab.settings));
    assert_eq!(*provider.trust_bundle(), vec![lab.serving_root.clone()]);
    let m = SecretManager::new(provider.clone(), Duration::from_secs(3600));
    let id = Identity::new("cluster.local", "shop", "web");
    let held = m.fetch(&id).await.unwrap();
    assert_eq!(
        ztunnel::identity::identities_in_cert(&held.cert.chain[0]).unwrap(),
        vec![id.clone()]
    );
    assert_eq!(*provider.trust_bundle(), lab.roots, "both returned roots");
    assert_eq!(
        *held.roots, lab.roots,
        "the held cert verifies peers with them"
    );
    let seen = lab.issuer.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer node-token"));
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(
        seen[0].impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(seen[0].validity, 3600);
    assert_eq!(m.issuer_error(), None);
    let text = metrics(&m);
    assert!(
        text.contains("ztunnel_ca_requests_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("ztunnel_ca_healthy 1"), "{text}");
    assert!(
        text.contains("ztunnel_ca_request_duration_seconds_count 1"),
        "{text}"
    );

    // A second identity reuses the connection; the bundle (now without the --ca-root
    // serving root) still verifies the issuer because --ca-root stays trusted for it.
    let other = Identity::new("cluster.local", "shop", "db");
    m.fetch(&other).await.unwrap();
    assert_eq!(lab.issuer.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn refusal_is_an_error_and_flips_health_until_the_next_success() {
    let lab = lab().await;
    let m = SecretManager::new(Arc::new(client(&lab.settings)), Duration::from_secs(3600));
    let id = Identity::new("cluster.local", "shop", "web");
    lab.issuer.refuse.store(true, Ordering::SeqCst);
    let err = chain(&m.fetch(&id).await.unwrap_err());
    assert!(
        err.contains("refused") && err.contains("runs no pod of this identity"),
        "{err}"
    );
    let why = m.issuer_error().expect("unhealthy");
    assert!(why.contains("runs no pod of this identity"), "{why}");
    let text = metrics(&m);
    assert!(text.contains("ztunnel_ca_healthy 0"), "{text}");
    assert!(
        text.contains("ztunnel_ca_requests_total{result=\"error\"} 1"),
        "{text}"
    );
    assert!(m.get(&id).is_none());

    lab.issuer.refuse.store(false, Ordering::SeqCst);
    m.fetch(&id).await.unwrap();
    assert_eq!(m.issuer_error(), None);
    assert!(metrics(&m).contains("ztunnel_ca_healthy 1"));
}

#[tokio::test]
async fn a_certificate_for_another_identity_is_not_installed() {
    let lab = lab().await;
    let m = SecretManager::new(Arc::new(client(&lab.settings)), Duration::from_secs(3600));
    *lab.issuer.swap_identity.lock().unwrap() =
        Some("spiffe://cluster.local/ns/kube-system/sa/admin".into());
    let id = Identity::new("cluster.local", "shop", "web");
    let err = chain(&m.fetch(&id).await.unwrap_err());
    assert!(
        err.contains("names [\"spiffe://cluster.local/ns/kube-system/sa/admin\"]"),
        "{err}"
    );
    assert!(m.get(&id).is_none());
    assert!(m.issuer_error().is_some());
}

#[tokio::test]
async fn token_and_server_name_problems_are_clear_errors() {
    let lab = lab().await;
    let id = Identity::new("cluster.local", "shop", "web");
    let with = |f: &dyn Fn(&mut IssuerSettings)| {
        let mut s = lab.settings.clone();
        f(&mut s);
        client(&s)
    };
    let empty = lab.settings.token.with_file_name("empty-token");
    std::fs::write(&empty, "  \n").unwrap();
    let c = with(&|s| s.token = empty.clone());
    let err = chain(&c.request(&id, Duration::from_secs(60)).await.unwrap_err());
    assert!(
        err.contains("is empty") && err.contains("--ca-token"),
        "{err}"
    );
    let c = with(&|s| s.token = Path::new("/nonexistent/token").into());
    let err = chain(&c.request(&id, Duration::from_secs(60)).await.unwrap_err());
    assert!(
        err.contains("cannot read the service-account token"),
        "{err}"
    );
    assert!(
        lab.issuer.seen.lock().unwrap().is_empty(),
        "nothing was sent"
    );

    // The serving certificate carries 127.0.0.1, not this name.
    let c = with(&|s| s.server_name = "ambient-issuer.istio-system.svc".into());
    let err = chain(&c.request(&id, Duration::from_secs(60)).await.unwrap_err());
    assert!(err.contains("TLS to the issuer"), "{err}");
    assert!(lab.issuer.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_issuer_fails_within_the_timeouts() {
    let lab = lab().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut s = lab.settings.clone();
    s.port = port;
    let c = client(&s);
    let id = Identity::new("cluster.local", "shop", "web");
    let err = chain(&c.issue(&id, Duration::from_secs(60)).await.unwrap_err());
    assert!(err.contains("cannot connect to the issuer"), "{err}");
    assert!(c.last_error().is_some());
}

/// `ztunnel run --ca-address`: a local pod's certificate comes from the issuer; while the
/// issuer refuses, readiness is 503 naming the error, and 200 again after the next success;
/// `/config_dump` shows the issuer and the trust bundle.
#[test]
fn app_with_issuer_reports_outage_in_readiness() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: ztunnel::config::RunArgs,
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lab = rt.block_on(lab());
    lab.issuer.refuse.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("pods.yaml"),
        "kind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\nkind: Pod\nmetadata: {name: p, namespace: a, uid: u}\nspec: {nodeName: n1, serviceAccountName: s}\nstatus: {podIP: 127.0.0.9}\n",
    )
    .unwrap();
    let sock = dir.path().join("z.sock");
    let mut argv = vec![
        "ztunnel".to_owned(),
        "--node-name=n1".into(),
        format!("--ca-address={}", lab.settings.address),
        format!("--ca-root={}", lab.settings.root.display()),
        format!("--ca-token={}", lab.settings.token.display()),
        format!("--agent-socket={}", sock.display()),
        format!("--manifest-dir={}", m.display()),
        "--mark=0".into(),
        "--transparent=false".into(),
        "--tcp-migrate-req=false".into(),
        "--drain-timeout=1s".into(),
    ];
    for flag in [
        "--outbound-addr",
        "--inbound-addr",
        "--inbound-plaintext-addr",
        "--admin-addr",
        "--metrics-addr",
        "--readiness-addr",
    ] {
        argv.push(format!("{flag}=127.0.0.1:0"));
    }
    let cfg = ztunnel::config::Config::from_args(&Cli::try_parse_from(argv).unwrap().run).unwrap();
    let app = ztunnel::app::App::build(cfg, rt.handle(), rt.handle()).unwrap();
    let addrs = app.addresses().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = rt.handle().clone();
    let runner = rt.spawn(async move {
        app.run(h.clone(), h, async {
            let _ = stop_rx.await;
        })
        .await
    });
    wait_until(
        "503 naming the issuer's refusal",
        Duration::from_secs(15),
        || {
            http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
                .ok()
                .is_some_and(|(code, body)| {
                    code == 503
                        && body.contains("certificate issuer")
                        && body.contains("runs no pod")
                })
        },
    );
    let (_, metrics) = http_get(addrs.metrics, "/metrics", HTTP_TIMEOUT)
        .ok()
        .unwrap();
    assert!(metrics.contains("ztunnel_ca_healthy 0"), "{metrics}");
    lab.issuer.refuse.store(false, Ordering::SeqCst);
    wait_until(
        "ready after the retry succeeds",
        Duration::from_secs(15),
        || {
            http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
                .ok()
                .map(|r| r.0)
                == Some(200)
        },
    );
    let (_, dump) = http_get(addrs.admin, "/config_dump", HTTP_TIMEOUT)
        .ok()
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["ca"]["source"]["mode"], "issuer");
    assert_eq!(
        dump["ca"]["source"]["address"],
        lab.settings.address.as_str()
    );
    let subjects: Vec<_> = dump["ca"]["trust_bundle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(subjects[1].contains("next root"), "{subjects:?}");
    assert!(dump["ca"]["trust_bundle"][0]["sha256"]
        .as_str()
        .is_some_and(|h| h.len() == 64));
    assert!(
        dump["certificates"]
            .to_string()
            .contains("spiffe://cluster.local/ns/a/sa/s"),
        "{dump}"
    );
    stop_tx.send(()).unwrap();
    rt.block_on(runner).unwrap();
}
