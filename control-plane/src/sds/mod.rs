//! The SDS server Envoy fetches leaf certificates from (DESIGN.md §4): delta xDS
//! over gRPC (`envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets`), on a
//! Unix socket of its own, peer-checked like the data-plane socket, never on TCP.
//!
//! The contract with Envoy's `envoy.tls.certificate_selectors.on_demand_secret` and
//! its SNI mapper: at a ClientHello, Envoy subscribes to a secret **named after the
//! SNI**. The answer is a `Secret` of that very name (as Envoy spelled it) holding a
//! `tls_certificate` whose chain and key are inline bytes, minted for the normalized
//! name (lowercase, no trailing dot) by [`crate::leaves`]; or, when the name is not
//! servable, the name in `removed_resources`, which makes Envoy fail the handshake.
//!
//! Per stream ([`StreamState`]): the names Envoy subscribed to and what it was told
//! about each. A subscription is answered once; an unsubscription forgets the name;
//! an ACK or NACK (a request with `response_nonce`) is not answered again, only the
//! subscription changes it carries. When [`crate::leaves::Leaves`] announces a change
//! (a re-minted or dropped certificate, a rotated CA, new rules, a new budget period),
//! every stream compares each of its names with what it told Envoy and pushes the
//! difference: a renewed leaf long before the old one expires, a removal when a rule
//! is gone, a certificate for a name that was refused until a rule was added. A
//! stream follows at most as many names as the server may hold certificates; past
//! that, new names are refused without being remembered.
//!
//! The private keys travel in the encoded protobuf messages, which tonic owns and
//! does not wipe; on this socket only Envoy (an allowed peer) reads them.
//!
//! The state-of-the-world variant (`StreamSecrets`) and `FetchSecrets` answer
//! `UNIMPLEMENTED`: Envoy's on-demand selector speaks delta xDS.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::LeafCertificate;
use crate::leaves::{Leaves, Refusal};

/// The type of every resource this server serves.
pub fn secret_type_url() -> String {
    <Secret as prost::Name>::type_url()
}

/// Resources per response: a burst of renewals goes out in several messages, each well
/// under gRPC's usual 4 MiB receive limit (a leaf is about 1.5 KiB).
pub const RESOURCES_PER_RESPONSE: usize = 100;

/// The default name of the SDS socket, in the data-plane socket's directory.
pub const DEFAULT_SOCKET_NAME: &str = "sds.sock";

/// What a stream told Envoy about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    /// A certificate for `name` (normalized) at `version`.
    Leaf { name: String, version: String },
    /// Its removal; remembered because a later rule or budget may change the answer.
    Refused,
}

/// One Envoy stream: the names it subscribed to and what it was told. Dropping it
/// releases its subscriptions.
pub struct StreamState {
    leaves: Arc<Leaves>,
    /// By the name as Envoy asked for it.
    told: HashMap<String, Told>,
    nonce: u64,
    max_names: usize,
    type_url: String,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("names", &self.told.len())
            .field("nonce", &self.nonce)
            .finish()
    }
}

/// The `Secret` for `requested` (the name Envoy asked for) holding `leaf`.
fn resource(requested: &str, leaf: &LeafCertificate, type_url: &str) -> Resource {
    let inline = |bytes: &[u8]| DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    };
    let secret = Secret {
        name: requested.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(leaf.chain_pem.as_bytes())),
            private_key: Some(inline(leaf.key.expose_pem().as_bytes())),
            ..Default::default()
        })),
    };
    Resource {
        name: requested.to_string(),
        version: leaf.version(),
        resource: Some(Any {
            type_url: type_url.to_string(),
            value: secret.encode_to_vec(),
        }),
        ..Default::default()
    }
}

impl StreamState {
    pub fn new(leaves: Arc<Leaves>) -> StreamState {
        let max_names = leaves.limits().max_held;
        StreamState {
            leaves,
            told: HashMap::new(),
            nonce: 0,
            max_names,
            type_url: secret_type_url(),
        }
    }

    /// Names this stream follows.
    pub fn names(&self) -> usize {
        self.told.len()
    }

    /// Handles one request: unsubscriptions, then subscriptions (each answered with
    /// its certificate or its removal). ACKs and NACKs are not answered. An error
    /// ends the stream.
    pub fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
    ) -> Result<Vec<DeltaDiscoveryResponse>, Status> {
        if !request.type_url.is_empty() && request.type_url != self.type_url {
            return Err(Status::invalid_argument(format!(
                "this SDS server serves {} only, not {}",
                self.type_url, request.type_url
            )));
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(
                nonce = %request.response_nonce,
                error = %error.message,
                "Envoy rejected certificates this server sent"
            );
        }
        for name in &request.resource_names_unsubscribe {
            if let Some(Told::Leaf { name, .. }) = self.told.remove(name) {
                self.leaves.unsubscribe(&name);
            }
        }
        let mut fresh: Vec<String> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for name in &request.resource_names_subscribe {
            // `*` asks for everything (wildcard xDS); there is no "everything" here.
            if name.is_empty() || name == "*" {
                continue;
            }
            if !self.told.contains_key(name) && self.told.len() + fresh.len() >= self.max_names {
                removed.push(name.clone());
                self.leaves.count_refusal(Refusal::TooManyHeld);
                continue;
            }
            fresh.push(name.clone());
        }
        fresh.sort();
        fresh.dedup();
        let (resources, more_removed) =
            self.reconcile(fresh, Some(&request.initial_resource_versions));
        removed.extend(more_removed);
        Ok(self.responses(resources, removed))
    }

    /// After an announced change: what changed for this stream's names, if anything.
    pub fn on_change(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let names: Vec<String> = self.told.keys().cloned().collect();
        let (resources, removed) = self.reconcile(names, None);
        self.responses(resources, removed)
    }

    /// Asks [`Leaves`] about `names` and works out what to tell Envoy. For a new
    /// subscription (`initial` given: the versions Envoy says it has) everything is
    /// told, unless Envoy has the very version; otherwise only what differs from what
    /// was told before.
    fn reconcile(
        &mut self,
        names: Vec<String>,
        initial: Option<&HashMap<String, String>>,
    ) -> (Vec<Resource>, Vec<String>) {
        let answers = {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            self.leaves.serve(&refs)
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for (requested, answer) in names.into_iter().zip(answers) {
            let before = self.told.remove(&requested);
            let subscribed = match &before {
                Some(Told::Leaf { name, .. }) => Some(name.clone()),
                _ => None,
            };
            match answer {
                Ok(leaf) => {
                    if subscribed.as_deref() != Some(leaf.name.as_str()) {
                        if let Some(old) = &subscribed {
                            self.leaves.unsubscribe(old);
                        }
                        self.leaves.subscribe(&leaf.name);
                    }
                    let version = leaf.version();
                    let known = match (initial, &before) {
                        (Some(initial), _) => initial.get(&requested),
                        (None, Some(Told::Leaf { version, .. })) => Some(version),
                        (None, _) => None,
                    };
                    if known != Some(&version) {
                        resources.push(resource(&requested, &leaf, &self.type_url));
                    }
                    self.told.insert(
                        requested,
                        Told::Leaf {
                            name: leaf.name.clone(),
                            version,
                        },
                    );
                }
                Err(refusal) => {
                    if let Some(old) = &subscribed {
                        self.leaves.unsubscribe(old);
                    }
                    if initial.is_some() || before != Some(Told::Refused) {
                        removed.push(requested.clone());
                        self.leaves.count_refusal(refusal);
                        log_refusal(refusal);
                    }
                    if refusal.may_change() {
                        self.told.insert(requested, Told::Refused);
                    }
                }
            }
        }
        (resources, removed)
    }

    /// The responses carrying `resources` and `removed` (none when both are empty),
    /// at most [`RESOURCES_PER_RESPONSE`] resources each, each with its own nonce.
    fn responses(
        &mut self,
        mut resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        let mut removed = Some(removed).filter(|r| !r.is_empty());
        while !resources.is_empty() || removed.is_some() {
            let rest = resources.split_off(resources.len().min(RESOURCES_PER_RESPONSE));
            let batch = std::mem::replace(&mut resources, rest);
            self.nonce += 1;
            out.push(DeltaDiscoveryResponse {
                resources: batch,
                type_url: self.type_url.clone(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce: self.nonce.to_string(),
                ..Default::default()
            });
        }
        out
    }
}

fn log_refusal(refusal: Refusal) {
    tracing::debug!(
        reason = refusal.as_str(),
        "told Envoy a certificate name is not served"
    );
}

impl Drop for StreamState {
    fn drop(&mut self) {
        for told in self.told.values() {
            if let Told::Leaf { name, .. } = told {
                self.leaves.unsubscribe(name);
            }
        }
    }
}

/// The `SecretDiscoveryService` of [`Leaves`]. Streams end when `stop` turns true, so
/// a graceful shutdown does not wait for Envoy to hang up.
pub struct SecretService {
    leaves: Arc<Leaves>,
    stop: watch::Receiver<bool>,
}

impl SecretService {
    pub fn new(leaves: Arc<Leaves>, stop: watch::Receiver<bool>) -> SecretService {
        SecretService { leaves, stop }
    }
}

type Answers = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
type StateOfTheWorld = ReceiverStream<Result<DiscoveryResponse, Status>>;

const DELTA_ONLY: &str =
    "this SDS server speaks delta xDS only: configure the config source with api_type DELTA_GRPC";

#[tonic::async_trait]
impl SecretDiscoveryService for SecretService {
    type DeltaSecretsStream = Answers;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let state = StreamState::new(self.leaves.clone());
        tokio::spawn(run_stream(
            state,
            request.into_inner(),
            tx,
            self.stop.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type StreamSecretsStream = StateOfTheWorld;

    async fn stream_secrets(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<StateOfTheWorld>, Status> {
        Err(Status::unimplemented(DELTA_ONLY))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(DELTA_ONLY))
    }
}

/// Runs `work` on the stream's state on the blocking pool (it may mint many
/// certificates) and gives the state back.
async fn off_the_runtime<T: Send + 'static>(
    mut state: StreamState,
    work: impl FnOnce(&mut StreamState) -> T + Send + 'static,
) -> Option<(StreamState, T)> {
    tokio::task::spawn_blocking(move || {
        let out = work(&mut state);
        (state, out)
    })
    .await
    .ok()
}

/// One stream: requests and announced changes in, responses out, until Envoy hangs
/// up, the response side closes or the server stops.
async fn run_stream(
    mut state: StreamState,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = state.leaves.changes();
    changes.mark_unchanged();
    loop {
        let answers = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    let Some((back, answers)) =
                        off_the_runtime(state, move |s| s.on_request(&request)).await
                    else {
                        return;
                    };
                    state = back;
                    answers
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "an SDS stream ended");
                    return;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some((back, answers)) = off_the_runtime(state, |s| s.on_change()).await
                else {
                    return;
                };
                state = back;
                Ok(answers)
            }
            // The guard `wait_for` returns is not `Send`: drop it inside.
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => return,
            () = tx.closed() => return,
        };
        match answers {
            Ok(answers) => {
                for answer in answers {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

/// Serves SDS for `leaves` on `incoming` (the peer-checked Unix socket's connections)
/// until `shutdown`; open streams are ended then. The same server answers Envoy's
/// gRPC access log ([`crate::dataplane::als`]), which stores into `dataplane`'s
/// request log.
pub async fn serve<I>(
    leaves: Arc<Leaves>,
    dataplane: crate::dataplane::DataplaneState,
    incoming: I,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = std::io::Result<tokio::net::UnixStream>>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = SecretDiscoveryServiceServer::new(SecretService::new(leaves, stop_rx));
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(service)
        .add_service(crate::dataplane::als::service(dataplane))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests;
