//! The SDS server in process: a real tonic gRPC client (as Envoy's delta xDS client
//! would talk) over the real peer-checked Unix socket, against a store on a manual
//! clock (started at the real time). Each certificate received is checked by a real TLS handshake: a rustls
//! server with the secret's chain and key, a client that trusts only the CA and asks
//! for the name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::*;
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::leaves::LeafLimits;
use crate::server::{bind_socket_as, PeerPolicy, SDS_SOCKET};
use crate::store::Store;
use crate::testing::{owner, temp_store};

/// A running SDS server on a temporary socket; stopped when dropped.
struct Running {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    clock: Arc<ManualClock>,
    leaves: Arc<Leaves>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

const LIMITS: LeafLimits = LeafLimits {
    ttl_secs: 3600,
    new_names_per_period: 1000,
    period_secs: 3600,
    max_held: 10_000,
};

fn add_rule(store: &Store, name: &str, host: &str) {
    let service = serde_json::from_value(serde_json::json!({
        "name": name, "host": host, "auth": {"type": "passthrough"}
    }))
    .unwrap();
    store.add_service(&owner(), "default", service).unwrap();
}

async fn start(limits: LeafLimits) -> Running {
    // Real handshakes check validity against the real time: start the clock there.
    let clock = ManualClock::new(SystemClock.now_ms());
    let (dir, store) = temp_store(clock.clone(), false);
    let store = Arc::new(store);
    add_rule(&store, "wild", "*.example.com");
    add_rule(&store, "exact", "api.example.org:8443/v1/*");
    let leaves = Leaves::open(store.clone(), limits).unwrap();
    let socket = dir.path().join("run").join("sds.sock");
    let listener = bind_socket_as(&socket, PeerPolicy::current_user(None), SDS_SOCKET)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dataplane =
        crate::dataplane::DataplaneState::new(store.clone(), crate::logs::LogRetention::default());
    let served = tokio::spawn(serve(
        leaves.clone(),
        dataplane,
        listener.into_incoming(),
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        _dir: dir,
        store,
        clock,
        leaves,
        socket,
        stop: Some(stop),
        served: Some(served),
    }
}

async fn channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://sds.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}

/// One delta SDS stream, as Envoy opens it.
struct Envoy {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Envoy {
    async fn connect(socket: &Path) -> Envoy {
        let (requests, rx) = mpsc::channel(16);
        let mut client = SecretDiscoveryServiceClient::new(channel(socket).await);
        let responses = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Envoy {
            requests,
            responses,
        }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.unwrap();
    }

    async fn subscribe(&self, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, nonce: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("an answer within 10 s")
            .expect("no error")
            .expect("the stream is open")
    }

    /// Whether nothing arrives for `wait`.
    async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.responses.message())
            .await
            .is_err()
    }
}

/// The certificate chain and key (PEM) of a resource, checked to be a `Secret` of the
/// resource's name.
fn tls_pair(
    resource: &envoy_types::pb::envoy::service::discovery::v3::Resource,
) -> (String, String) {
    let any = resource.resource.as_ref().expect("a resource body");
    assert_eq!(any.type_url, secret_type_url());
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    assert_eq!(secret.name, resource.name, "the secret is named as asked");
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a TLS certificate: {secret:?}");
    };
    let inline = |source: Option<DataSource>| match source.and_then(|s| s.specifier) {
        Some(Specifier::InlineBytes(bytes)) => String::from_utf8(bytes).unwrap(),
        other => panic!("not inline bytes: {other:?}"),
    };
    (inline(tls.certificate_chain), inline(tls.private_key))
}

/// A TLS handshake between a server presenting `chain`/`key` and a client that trusts
/// only `ca_pem` and asks for `name`; the error if it fails.
async fn handshake(ca_pem: &str, chain: &str, key: &str, name: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (near, far) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let accepted = tokio::spawn(async move { acceptor.accept(far).await.map(|_| ()) });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let connected = connector.connect(name, near).await.map(|_| ());
    let _ = accepted.await;
    connected.map_err(|e| e.to_string())
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servable_name_gets_a_certificate_the_ca_vouches_for_and_others_are_removed() {
    let sds = start(LIMITS).await;
    let ca_pem = sds.leaves.ca_pem();
    let mut envoy = Envoy::connect(&sds.socket).await;
    envoy
        .subscribe(&[
            "API.Example.com",
            "api.example.org",
            "evil.example.net",
            "127.0.0.1",
            "a.b.example.com",
        ])
        .await;
    let answer = envoy.next().await;
    assert_eq!(answer.type_url, secret_type_url());
    let mut names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["API.Example.com", "api.example.org"]);
    let mut removed = answer.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        ["127.0.0.1", "a.b.example.com", "evil.example.net"]
    );

    for resource in &answer.resources {
        let (chain, key) = tls_pair(resource);
        let name = resource.name.to_ascii_lowercase();
        handshake(&ca_pem, &chain, &key, &name).await.unwrap();
        crate::ca::tests::verifies(
            &crate::ca::pem_to_der(&ca_pem).unwrap(),
            &chain,
            &name,
            sds.clock.now_secs(),
        )
        .unwrap();
        let other = handshake(&ca_pem, &chain, &key, "evil.example.net").await;
        assert!(other.is_err(), "the certificate is for its name only");
    }

    // The ACK is not answered; neither is a NACK.
    envoy.ack(&answer.nonce).await;
    envoy
        .send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            response_nonce: answer.nonce.clone(),
            error_detail: Some(rpc::Status {
                code: 3,
                message: "a test NACK".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert!(envoy.quiet_for(Duration::from_millis(300)).await);

    // An ACK that carries a new subscription gets that one answered.
    envoy
        .send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            response_nonce: answer.nonce.clone(),
            resource_names_subscribe: vec!["new.example.com".into()],
            ..Default::default()
        })
        .await;
    let more = envoy.next().await;
    assert_eq!(more.resources.len(), 1);
    assert_eq!(more.resources[0].name, "new.example.com");
    assert_ne!(more.nonce, answer.nonce);
    assert_eq!(sds.leaves.stats().held, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_rotation_and_rule_changes_are_pushed_to_the_names_still_subscribed() {
    let sds = start(LeafLimits {
        ttl_secs: 30,
        ..LIMITS
    })
    .await;
    let mut envoy = Envoy::connect(&sds.socket).await;
    envoy
        .subscribe(&["a.example.com", "b.example.com", "later.example.net"])
        .await;
    let first = envoy.next().await;
    assert_eq!(first.resources.len(), 2);
    assert_eq!(first.removed_resources, ["later.example.net"]);
    let version_of = |answer: &DeltaDiscoveryResponse, name: &str| {
        answer
            .resources
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.version.clone())
    };
    let a1 = version_of(&first, "a.example.com").unwrap();

    // Unsubscribed names are forgotten: only `a` is pushed from now on.
    envoy
        .send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            resource_names_unsubscribe: vec!["b.example.com".into()],
            ..Default::default()
        })
        .await;
    assert!(envoy.quiet_for(Duration::from_millis(200)).await);

    // Two thirds into its life, `a` is re-minted and pushed, long before it expires.
    sds.clock.advance_secs(20);
    sds.leaves.maintain().unwrap();
    let renewed = envoy.next().await;
    assert_eq!(renewed.removed_resources, Vec::<String>::new());
    let a2 = version_of(&renewed, "a.example.com").expect("a pushed");
    assert_ne!(a1, a2);
    assert!(version_of(&renewed, "b.example.com").is_none());
    let (chain, key) = tls_pair(&renewed.resources[0]);
    let ca_pem = sds.leaves.ca_pem();
    handshake(&ca_pem, &chain, &key, "a.example.com")
        .await
        .unwrap();
    assert_eq!(
        sds.leaves.stats().held,
        1,
        "the unsubscribed b was dropped when due"
    );

    // A rule for the refused name: its certificate is pushed without a new request.
    add_rule(&sds.store, "later", "later.example.net");
    sds.leaves.maintain().unwrap();
    let granted = envoy.next().await;
    assert!(version_of(&granted, "later.example.net").is_some());

    // CA rotation: both names are pushed again, signed by the new CA only.
    let summary = sds.leaves.rotate_ca().unwrap();
    let rotated = envoy.next().await;
    assert_eq!(rotated.resources.len(), 2);
    let new_ca = sds.leaves.ca_pem();
    assert_ne!(new_ca, ca_pem);
    for resource in &rotated.resources {
        assert!(resource
            .version
            .starts_with(&format!("{}-", summary.generation)));
        let (chain, key) = tls_pair(resource);
        handshake(&new_ca, &chain, &key, &resource.name)
            .await
            .unwrap();
        assert!(handshake(&ca_pem, &chain, &key, &resource.name)
            .await
            .is_err());
    }

    // The rule is removed: its certificate is withdrawn.
    sds.store
        .remove_service(&owner(), "default", "later")
        .unwrap();
    sds.leaves.maintain().unwrap();
    let withdrawn = envoy.next().await;
    assert_eq!(withdrawn.removed_resources, ["later.example.net"]);
    assert!(withdrawn.resources.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_distinct_names_from_one_stream_stay_within_the_bound() {
    let sds = start(LIMITS).await;
    let mut envoy = Envoy::connect(&sds.socket).await;
    let names: Vec<String> = (0..1500).map(|i| format!("n{i}.example.com")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    envoy.subscribe(&refs).await;
    let (mut served, mut removed) = (0, 0);
    while served + removed < names.len() {
        let answer = envoy.next().await;
        assert!(answer.resources.len() <= RESOURCES_PER_RESPONSE);
        served += answer.resources.len();
        removed += answer.removed_resources.len();
    }
    assert_eq!((served, removed), (1000, 500));
    assert_eq!(sds.leaves.stats().held, 1000);

    // A second stream asking for more new names this hour gets nothing new.
    let mut other = Envoy::connect(&sds.socket).await;
    let more: Vec<String> = (0..200).map(|i| format!("m{i}.example.com")).collect();
    other
        .subscribe(&more.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let answer = other.next().await;
    assert!(answer.resources.is_empty());
    assert_eq!(answer.removed_resources.len(), 200);
    // ...but names already held are served to it at no cost.
    other.subscribe(&["n1.example.com"]).await;
    assert_eq!(other.next().await.resources.len(), 1);
    assert_eq!(sds.leaves.stats().held, 1000);
    assert_eq!(sds.leaves.stats().minted, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_envoy_is_not_sent_what_it_already_has() {
    let sds = start(LIMITS).await;
    let mut envoy = Envoy::connect(&sds.socket).await;
    envoy.subscribe(&["a.example.com", "b.example.com"]).await;
    let first = envoy.next().await;
    drop(envoy);
    let mut again = Envoy::connect(&sds.socket).await;
    let known = first
        .resources
        .iter()
        .filter(|r| r.name == "a.example.com")
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    again
        .send(DeltaDiscoveryRequest {
            type_url: secret_type_url(),
            resource_names_subscribe: vec!["a.example.com".into(), "b.example.com".into()],
            initial_resource_versions: known,
            ..Default::default()
        })
        .await;
    let answer = again.next().await;
    let names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["b.example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_types_and_state_of_the_world_are_refused() {
    let sds = start(LIMITS).await;
    let mut envoy = Envoy::connect(&sds.socket).await;
    envoy
        .send(DeltaDiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            resource_names_subscribe: vec!["a.example.com".into()],
            ..Default::default()
        })
        .await;
    let status = tokio::time::timeout(Duration::from_secs(10), envoy.responses.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("Secret"), "{}", status.message());

    let mut client = SecretDiscoveryServiceClient::new(channel(&sds.socket).await);
    let status = client
        .fetch_secrets(DiscoveryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("DELTA_GRPC"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_its_subscriptions_and_shutdown_does_not_wait_for_envoy() {
    let mut sds = start(LeafLimits {
        ttl_secs: 30,
        ..LIMITS
    })
    .await;
    let mut envoy = Envoy::connect(&sds.socket).await;
    envoy.subscribe(&["a.example.com"]).await;
    envoy.next().await;
    drop(envoy);
    // Once the stream is gone nobody subscribes: the certificate is dropped when due.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sds.clock.advance_secs(20);
    sds.leaves.maintain().unwrap();
    assert_eq!(sds.leaves.stats().held, 0);

    // An open stream does not hold the server up at shutdown.
    let _open = Envoy::connect(&sds.socket).await;
    let _ = sds.stop.take().unwrap().send(());
    let served = sds.served.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the server stopped with a stream open");
    assert!(result.unwrap().is_ok());
}
