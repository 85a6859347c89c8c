//! The gRPC API (`proto/xsrec/v1/recommender.proto`): a thin tonic adapter over the core, as
//! `api/` is for REST — convert, admit, call the core, convert back. Errors keep the core's stable
//! code in the `xsrec-code` metadata entry beside the gRPC status; a client's `grpc-timeout`
//! shorter than the server's request timeout becomes the request's deadline inside the engine.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::health::Readiness;
use crate::recommend::request_id::{accept_or_generate, log_failure, Failure};
use crate::recommend::types::{self as core_types, DEFAULT_K, DEFAULT_TOP};
use crate::recommend::{CoreError, Deadline, Operation, Recommender, ServedModel};

/// The generated messages and service.
pub mod pb {
    tonic::include_proto!("xsrec.v1");
    /// For the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xsrec_descriptor");
}

use pb::recommender_server::RecommenderServer;

mod edge;

/// The service's full name, as health checks ask for it.
pub const SERVICE_NAME: &str = "xsrec.v1.Recommender";

/// The metadata entry that carries a failure's stable code (REST's `error.code`).
const XSREC_CODE: &str = "xsrec-code";

/// The gRPC status of a core error: the code a gRPC client branches on, with the core's own code
/// in the `xsrec-code` metadata entry.
pub fn status(error: CoreError) -> Status {
    let code = match &error {
        CoreError::InvalidRequest(_) => Code::InvalidArgument,
        CoreError::UserNotFound(_) => Code::NotFound,
        CoreError::CategoriesUnavailable => Code::FailedPrecondition,
        CoreError::Overloaded => Code::ResourceExhausted,
        CoreError::NotReady(_) | CoreError::ShuttingDown => Code::Unavailable,
        CoreError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        CoreError::InferenceFailed(_) | CoreError::StorageFailed(_) => Code::Internal,
        CoreError::Unauthenticated(_) => Code::Unauthenticated,
        CoreError::Forbidden(_) => Code::PermissionDenied,
        CoreError::ModelLoadFailed(_) => Code::InvalidArgument,
        CoreError::ModelIncompatible(_) => Code::FailedPrecondition,
    };
    let mut status = Status::new(code, error.to_string());
    status
        .metadata_mut()
        .insert(XSREC_CODE, MetadataValue::from_static(error.code()));
    status
}

/// The client's `grpc-timeout` header (an integer of at most 8 digits and a unit), if any.
fn client_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Who calls: the `authorization` metadata entry (`Bearer KEY`) for the core to judge, and the
/// request id (the `x-request-id` entry when sensible, else a new one), echoed in the response's
/// metadata, success or error.
struct Caller {
    key: Option<String>,
    request_id: String,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Self {
        Self::from_entries(|name| request.metadata().get(name).and_then(|v| v.to_str().ok()))
    }

    fn from_entries<'a>(entry: impl Fn(&'static str) -> Option<&'a str>) -> Self {
        Self {
            key: entry("authorization").map(str::to_owned),
            request_id: accept_or_generate(entry(REQUEST_ID)),
        }
    }

    fn echo(&self, metadata: &mut tonic::metadata::MetadataMap) {
        let id = MetadataValue::try_from(self.request_id.as_str()).expect("request ids are tokens");
        metadata.insert(REQUEST_ID, id);
    }

    fn answer<T>(&self, reply: T) -> Response<T> {
        let mut response = Response::new(reply);
        self.echo(response.metadata_mut());
        response
    }
}

const REQUEST_ID: &str = "x-request-id";

pub struct GrpcService {
    core: Arc<Recommender>,
}

/// tonic enforces a client's `grpc-timeout` itself too, answering CANCELLED when its timer
/// fires first; the core's deadline ends one timer tick earlier, so that the client hears
/// DEADLINE_EXCEEDED from the core.
const TIMER_TICK: Duration = Duration::from_millis(1);

impl GrpcService {
    fn deadline<T>(&self, request: &Request<T>) -> Deadline {
        self.core
            .deadline(client_timeout(request).map(|t| t.saturating_sub(TIMER_TICK)))
    }

    /// The service behind its edge (see `edge`); a unary call's message must arrive within
    /// `body_read_timeout`.
    pub fn server(core: Arc<Recommender>, body_read_timeout: Duration) -> edge::Edge<RecommenderServer<Self>> {
        for (method, _) in METHODS {
            core.metrics.requests.with_label_values(&[method, "OK"]);
        }
        // The same bound on a request's size as REST's --max-body-bytes.
        let max_bytes = core.limits.max_body_bytes;
        let service = RecommenderServer::new(Self { core: core.clone() })
            .max_decoding_message_size(max_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        edge::Edge::new(service, core, body_read_timeout)
    }

    /// Admits (readiness and room: the edge judged the caller's key before reading the
    /// message, and every call passes the edge), runs `call` and counts the outcome under
    /// `method` (the REST routes' metrics, with the gRPC code as the status label).
    async fn handle<T, F>(
        &self,
        (method, operation): (&str, Operation),
        caller: &Caller,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, CoreError>>,
    {
        let started = Instant::now();
        let outcome = match self.core.admit_authorized(operation) {
            Ok(_permit) => call.await,
            Err(refused) => Err(refused),
        };
        match outcome {
            Ok(reply) => {
                let metrics = &self.core.metrics;
                metrics
                    .request_duration
                    .with_label_values(&[method])
                    .observe(started.elapsed().as_secs_f64());
                metrics.requests.with_label_values(&[method, "OK"]).inc();
                Ok(caller.answer(reply))
            }
            Err(error) => Err(failed(&self.core, method, caller, started, error.into())),
        }
    }
}

/// Why a call failed, as a client and the metrics see it: the gRPC status, the stable code for
/// `xsrec-code` and the failure metric's `reason`, and whether the server is at fault.
struct CallFailure {
    status: Status,
    code: &'static str,
    server_fault: bool,
}

impl From<CoreError> for CallFailure {
    fn from(error: CoreError) -> Self {
        let (code, server_fault) = (error.code(), error.is_server_fault());
        Self {
            status: status(error),
            code,
            server_fault,
        }
    }
}

/// Counts and logs a failed call (duration, failure reason, status) and gives the status its
/// client gets: the stable code in `xsrec-code` and the request id beside it.
fn failed(core: &Recommender, method: &str, caller: &Caller, started: Instant, failure: CallFailure) -> Status {
    let metrics = &core.metrics;
    metrics
        .request_duration
        .with_label_values(&[method])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .request_failures
        .with_label_values(&[method, failure.code])
        .inc();
    let mut status = failure.status;
    let grpc_code = format!("{:?}", status.code());
    let logged = Failure {
        code: failure.code,
        message: status.message(),
        server_fault: failure.server_fault,
    };
    log_failure(&caller.request_id, method, &grpc_code, &logged, started.elapsed());
    status
        .metadata_mut()
        .insert(XSREC_CODE, MetadataValue::from_static(failure.code));
    caller.echo(status.metadata_mut());
    metrics.requests.with_label_values(&[method, &grpc_code]).inc();
    status
}

/// Each method's full path (its metrics label) and the core operation it is.
const METHODS: [(&str, Operation); 9] = [
    ("/xsrec.v1.Recommender/Recommend", Operation::Recommend),
    ("/xsrec.v1.Recommender/RecommendBatch", Operation::RecommendBatch),
    ("/xsrec.v1.Recommender/Interests", Operation::Interests),
    ("/xsrec.v1.Recommender/IngestEvents", Operation::Ingest),
    ("/xsrec.v1.Recommender/IngestEventStream", Operation::Ingest),
    ("/xsrec.v1.Recommender/GetHistory", Operation::History),
    ("/xsrec.v1.Recommender/ForgetUser", Operation::Forget),
    ("/xsrec.v1.Recommender/ModelInfo", Operation::ModelInfo),
    ("/xsrec.v1.Recommender/ReloadModel", Operation::ReloadModel),
];

#[tonic::async_trait]
impl pb::recommender_server::Recommender for GrpcService {
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let (deadline, caller) = (self.deadline(&request), Caller::of(&request));
        let call = self.core.recommend(request.into_inner().into(), deadline);
        self.handle(METHODS[0], &caller, async { Ok(call.await?.into()) }).await
    }

    async fn recommend_batch(
        &self,
        request: Request<pb::RecommendBatchRequest>,
    ) -> Result<Response<pb::RecommendBatchResponse>, Status> {
        let (deadline, caller) = (self.deadline(&request), Caller::of(&request));
        let batch = core_types::BatchRecommendRequest {
            requests: request.into_inner().requests.into_iter().map(Into::into).collect(),
        };
        let call = self.core.recommend_batch(batch, deadline);
        self.handle(METHODS[1], &caller, async {
            let reply = call.await?;
            Ok(pb::RecommendBatchResponse {
                results: reply.results.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn interests(
        &self,
        request: Request<pb::InterestsRequest>,
    ) -> Result<Response<pb::InterestsResponse>, Status> {
        let (deadline, caller) = (self.deadline(&request), Caller::of(&request));
        let request = request.into_inner();
        let call = self.core.interests(
            core_types::InterestsRequest {
                user_id: request.user_id,
                top: request.top.map_or(DEFAULT_TOP, |top| top as usize),
                at: request.at,
            },
            deadline,
        );
        self.handle(METHODS[2], &caller, async {
            let reply = call.await?;
            Ok(pb::InterestsResponse {
                user_id: reply.user_id,
                interests: reply
                    .interests
                    .into_iter()
                    .map(|c| pb::CategoryScore {
                        category: c.category,
                        score: c.score,
                    })
                    .collect(),
                model_version: reply.model_version,
                fallback: reply.fallback,
            })
        })
        .await
    }

    async fn ingest_events(
        &self,
        request: Request<pb::IngestEventsRequest>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let caller = Caller::of(&request);
        let call = self.core.ingest(request.into_inner().into());
        self.handle(METHODS[3], &caller, async { Ok(call.await?.into()) }).await
    }

    async fn ingest_event_stream(
        &self,
        request: Request<Streaming<pb::IngestEventsRequest>>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let caller = Caller::of(&request);
        let mut messages = request.into_inner();
        let mut total = pb::IngestEventsResponse::default();
        // Each message is admitted and stored on its own, as a unary call would be: a long
        // stream holds no permit between its messages.
        while let Some(message) = messages.next().await {
            // A message that does not decode ends the stream with tonic's status, which the edge
            // turns into ours; the messages before it are stored.
            let reply = self
                .handle(METHODS[4], &caller, self.core.ingest(message?.into()))
                .await?
                .into_inner();
            total.accepted += reply.accepted as u64;
            total.unknown_items += reply.unknown_items as u64;
            total.unknown_event_types += reply.unknown_event_types as u64;
        }
        Ok(caller.answer(total))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let caller = Caller::of(&request);
        let user = request.into_inner().user_id;
        self.handle(METHODS[5], &caller, async {
            let reply = self.core.history(&user)?;
            Ok(pb::GetHistoryResponse {
                user_id: reply.user_id,
                events: reply
                    .events
                    .into_iter()
                    .map(|e| pb::HistoryEvent {
                        item_id: e.item_id,
                        timestamp: e.timestamp,
                        event_type: e.event_type,
                        known_item: e.known_item,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn forget_user(
        &self,
        request: Request<pb::ForgetUserRequest>,
    ) -> Result<Response<pb::ForgetUserResponse>, Status> {
        let caller = Caller::of(&request);
        let user = request.into_inner().user_id;
        self.handle(METHODS[6], &caller, async {
            self.core.forget(&user).await?;
            Ok(pb::ForgetUserResponse {})
        })
        .await
    }

    async fn model_info(
        &self,
        request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let caller = Caller::of(&request);
        self.handle(METHODS[7], &caller, async { Ok(model_info(&self.core.served())) })
            .await
    }

    async fn reload_model(
        &self,
        request: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let caller = Caller::of(&request);
        let path = request.into_inner().path;
        self.handle(METHODS[8], &caller, async {
            let path = match path.is_empty() {
                true => None,
                false => Some(self.core.check_model_path(path)?),
            };
            let served = self.core.reload(path).await?;
            Ok(model_info(&served))
        })
        .await
    }
}

fn model_info(served: &ServedModel) -> pb::ModelInfoResponse {
    pb::ModelInfoResponse {
        version: served.version.clone(),
        config_json: served.config.to_string(),
    }
}

impl From<pb::RecommendRequest> for core_types::RecommendRequest {
    fn from(request: pb::RecommendRequest) -> Self {
        Self {
            user_id: request.user_id,
            k: request.k.map_or(DEFAULT_K, |k| k as usize),
            exclude_seen: request.exclude_seen.unwrap_or(true),
            // proto3 cannot tell an empty list from none: empty means the whole catalogue.
            candidates: (!request.candidates.is_empty()).then_some(request.candidates),
            at: request.at,
        }
    }
}

impl From<core_types::RecommendResponse> for pb::RecommendResponse {
    fn from(reply: core_types::RecommendResponse) -> Self {
        Self {
            user_id: reply.user_id,
            items: reply
                .items
                .into_iter()
                .map(|i| pb::ScoredItem {
                    item_id: i.item_id,
                    score: i.score,
                })
                .collect(),
            model_version: reply.model_version,
            fallback: reply.fallback,
            unknown_candidates: reply.unknown_candidates,
        }
    }
}

impl From<pb::IngestEventsRequest> for core_types::EventsRequest {
    fn from(request: pb::IngestEventsRequest) -> Self {
        Self {
            events: request
                .events
                .into_iter()
                .map(|e| core_types::EventIn {
                    user_id: e.user_id,
                    item_id: e.item_id,
                    timestamp: e.timestamp,
                    event_type: e.event_type,
                })
                .collect(),
        }
    }
}

impl From<core_types::EventsResponse> for pb::IngestEventsResponse {
    fn from(reply: core_types::EventsResponse) -> Self {
        Self {
            accepted: reply.accepted as u64,
            unknown_items: reply.unknown_items as u64,
            unknown_event_types: reply.unknown_event_types as u64,
        }
    }
}

/// Serves gRPC on the connections of `incoming` (the serving layer caps them) until `shutdown` completes, then lets in-flight calls finish: the
/// Recommender service, the standard health service (SERVING exactly while the core is ready)
/// and reflection.
pub async fn serve<Connection>(
    core: Arc<Recommender>,
    body_read_timeout: Duration,
    incoming: impl tokio_stream::Stream<Item = std::io::Result<Connection>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    Connection:
        tonic::transport::server::Connected + tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let watched = core.clone();
    let health_task = tokio::spawn(async move {
        let mut serving = None;
        loop {
            let ready = watched.readiness() == Readiness::Ready;
            if serving != Some(ready) {
                let status = match ready {
                    true => tonic_health::ServingStatus::Serving,
                    false => tonic_health::ServingStatus::NotServing,
                };
                reporter.set_service_status("", status).await;
                reporter.set_service_status(SERVICE_NAME, status).await;
                serving = Some(ready);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let served = tonic::transport::Server::builder()
        // h2 counts streams a client reset before the server accepted them and, past 20 (its
        // rapid-reset guard), tears the whole connection down with GOAWAY: under load, ordinary
        // client deadlines expiring in the queue reached that and failed every other call on the
        // connection with UNAVAILABLE (hostile probe: 2,488 healthy calls). Still bounded, higher.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        // REST's bound on a request's headers (h2's default is half of it); past it, h2 answers
        // HTTP 431 before any gRPC status can be made.
        .http2_max_header_list_size(Some(crate::api::MAX_HEADER_BYTES as u32))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(GrpcService::server(core, body_read_timeout))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    health_task.abort();
    Ok(served?)
}

/// Streams a client may reset before the server accepts them, per connection (see `serve`).
const MAX_PENDING_ACCEPT_RESETS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        let timeout = |text: &str| {
            let mut request = Request::new(());
            request.metadata_mut().insert("grpc-timeout", text.parse().unwrap());
            client_timeout(&request)
        };
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("99u"), Some(Duration::from_micros(99)));
        assert_eq!(timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "10", "10x", "-5m", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad}");
        }
        assert_eq!(client_timeout(&Request::new(())), None);
    }

    #[test]
    fn every_core_error_has_a_grpc_code_and_keeps_its_own() {
        let cases = [
            (CoreError::InvalidRequest("x".into()), Code::InvalidArgument),
            (CoreError::UserNotFound("u".into()), Code::NotFound),
            (CoreError::CategoriesUnavailable, Code::FailedPrecondition),
            (CoreError::Overloaded, Code::ResourceExhausted),
            (CoreError::NotReady("warming".into()), Code::Unavailable),
            (CoreError::DeadlineExceeded(5), Code::DeadlineExceeded),
            (CoreError::ShuttingDown, Code::Unavailable),
            (CoreError::InferenceFailed("x".into()), Code::Internal),
            (CoreError::StorageFailed("x".into()), Code::Internal),
            (CoreError::Unauthenticated("x".into()), Code::Unauthenticated),
            (CoreError::Forbidden("write"), Code::PermissionDenied),
            (CoreError::ModelLoadFailed("x".into()), Code::InvalidArgument),
            (CoreError::ModelIncompatible("x".into()), Code::FailedPrecondition),
        ];
        assert_eq!(cases.len(), CoreError::ALL_CODES.len());
        for (error, code) in cases {
            let own = error.code();
            let status = status(error);
            assert_eq!(status.code(), code, "{own}");
            assert_eq!(status.metadata().get("xsrec-code").unwrap(), own);
        }
    }
}
