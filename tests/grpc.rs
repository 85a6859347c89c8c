//! gRPC beside REST over real sockets: the same inputs give the same answers through both, the
//! core's errors arrive as gRPC codes with the core's own code attached, a client deadline
//! reaches the engine, and the standard health service follows readiness.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{fixture, ranked, server, users};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tonic::Code;
use xsrec::grpc::pb;
use xsrec::grpc::pb::recommender_client::RecommenderClient;

type Client = RecommenderClient<tonic::transport::Channel>;

async fn grpc_client(server: &common::Server) -> Client {
    let addr = server.running.grpc_addr.expect("gRPC is on in tests");
    RecommenderClient::connect(format!("http://{addr}")).await.unwrap()
}

fn event(user: &str, item: &str, timestamp: i64, kind: Option<&str>) -> pb::Event {
    pb::Event {
        user_id: user.to_owned(),
        item_id: item.to_owned(),
        timestamp,
        event_type: kind.map(str::to_owned),
    }
}

/// Scores are f32 on both paths; JSON writes an f32's shortest decimal, which reads back as the
/// very same f32, so the comparison is exact.
fn grpc_ranked(reply: &pb::RecommendResponse) -> Vec<(String, f32)> {
    reply.items.iter().map(|i| (i.item_id.clone(), i.score)).collect()
}

fn rest_ranked(reply: &Value) -> Vec<(String, f32)> {
    ranked(reply)
        .into_iter()
        .map(|(id, score)| (id, score as f32))
        .collect()
}

/// `xsrec_request_failures_total` of one route (a method's full path) and reason.
fn failure_count(exposition: &str, route: &str, reason: &str) -> f64 {
    common::metric_value(
        exposition,
        &format!("xsrec_request_failures_total{{reason=\"{reason}\",route=\"{route}\"}}"),
    )
}

fn xsrec_code(status: &tonic::Status) -> &str {
    status.metadata().get("xsrec-code").unwrap().to_str().unwrap()
}

/// The REST body and the gRPC message of one randomised recommend request.
fn recommend_pair(rng: &mut impl Rng, user: &str, items: &[String]) -> (Value, pb::RecommendRequest) {
    let k = rng.gen_range(1..=12u32);
    let exclude_seen = rng.gen_bool(0.5);
    let candidates: Vec<String> = match rng.gen_bool(0.3) {
        true => (0..rng.gen_range(1..8))
            .map(|_| items[rng.gen_range(0..items.len())].clone())
            .chain(std::iter::once("not-an-item".to_owned()))
            .collect(),
        false => Vec::new(),
    };
    let at = rng.gen_bool(0.5).then(|| rng.gen_range(1_000_000..50_000_000i64));
    let mut body = json!({"user_id": user, "k": k, "exclude_seen": exclude_seen});
    if !candidates.is_empty() {
        body["candidates"] = json!(candidates);
    }
    if let Some(at) = at {
        body["at"] = json!(at);
    }
    let message = pb::RecommendRequest {
        user_id: user.to_owned(),
        k: Some(k),
        exclude_seen: Some(exclude_seen),
        candidates,
        at,
    };
    (body, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_give_the_same_answers_to_the_same_inputs() {
    let fx = fixture();
    let server = server(&[]).await;
    let mut grpc = grpc_client(&server).await;
    // Ingest over gRPC (unary for half the users, streamed for the rest), read back over both.
    let by_user = users(&fx.events);
    let names: Vec<&str> = by_user.keys().copied().take(40).collect();
    let to_message = |user: &str| pb::IngestEventsRequest {
        events: by_user[user]
            .iter()
            .map(|e| event(&e.user_id, &e.item_id, e.timestamp, e.event_type.as_deref()))
            .collect(),
    };
    let (unary, streamed) = names.split_at(names.len() / 2);
    for user in unary {
        let reply = grpc.ingest_events(to_message(user)).await.unwrap().into_inner();
        assert_eq!(reply.accepted as usize, by_user[user].len());
    }
    let stream: Vec<pb::IngestEventsRequest> = streamed.iter().map(|user| to_message(user)).collect();
    let total = grpc
        .ingest_event_stream(tokio_stream::iter(stream))
        .await
        .unwrap()
        .into_inner();
    let expected: usize = streamed.iter().map(|user| by_user[user].len()).sum();
    assert_eq!(total.accepted as usize, expected);
    let known_item = &by_user[names[0]][0].item_id;
    let typo = pb::IngestEventsRequest {
        events: vec![event("typo-user", known_item, 5, Some("purchse"))],
    };
    let reply = grpc.ingest_events(typo).await.unwrap().into_inner();
    assert_eq!((reply.unknown_items, reply.unknown_event_types), (0, 1));
    for user in &names {
        let (status, body) = server.get(&format!("/v1/users/{user}/history")).await;
        assert_eq!(status, StatusCode::OK);
        let rest: Value = serde_json::from_str(&body).unwrap();
        let over_grpc = grpc
            .get_history(pb::GetHistoryRequest {
                user_id: user.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        let rest_events: Vec<(String, i64, bool)> = rest["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let id = e["item_id"].as_str().unwrap().to_owned();
                (id, e["timestamp"].as_i64().unwrap(), e["known_item"].as_bool().unwrap())
            })
            .collect();
        let grpc_events: Vec<(String, i64, bool)> = over_grpc
            .events
            .iter()
            .map(|e| (e.item_id.clone(), e.timestamp, e.known_item))
            .collect();
        assert_eq!(grpc_events, rest_events, "{user}");
    }

    // Randomised recommends, one at a time so that both see the same cached state: identical
    // items, scores and fallbacks. Users without history included (the popularity fallback).
    let items: Vec<String> = fx.events.iter().map(|e| e.item_id.clone()).take(500).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for case in 0..60 {
        let user = match case % 6 {
            0 => format!("nobody-{case}"),
            _ => names[rng.gen_range(0..names.len())].to_owned(),
        };
        let (body, message) = recommend_pair(&mut rng, &user, &items);
        let (status, rest) = server.post("/v1/recommend", &body).await;
        assert_eq!(status, StatusCode::OK, "{rest}");
        let over_grpc = grpc.recommend(message).await.unwrap().into_inner();
        assert_eq!(grpc_ranked(&over_grpc), rest_ranked(&rest), "case {case}: {body}");
        assert_eq!(over_grpc.fallback.as_deref(), rest["fallback"].as_str(), "case {case}");
        assert_eq!(over_grpc.model_version, rest["model_version"].as_str().unwrap());
        let rest_unknown: Vec<&str> = rest["unknown_candidates"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().map(|v| v.as_str().unwrap()).collect());
        assert_eq!(over_grpc.unknown_candidates, rest_unknown, "case {case}");
    }

    // A batch, and interests.
    let pairs: Vec<(Value, pb::RecommendRequest)> =
        (0..5).map(|i| recommend_pair(&mut rng, names[i], &items)).collect();
    let (status, rest) = server
        .post(
            "/v1/recommend/batch",
            &json!({"requests": pairs.iter().map(|p| p.0.clone()).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    let over_grpc = grpc
        .recommend_batch(pb::RecommendBatchRequest {
            requests: pairs.into_iter().map(|p| p.1).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    // A batch's rows may be scored in another batch composition on each path (cached states
    // from the single requests above, or fresh ones), which moves scores by an ulp or so.
    for (rest, over_grpc) in rest["results"].as_array().unwrap().iter().zip(&over_grpc.results) {
        let (rest, over_grpc) = (rest_ranked(rest), grpc_ranked(over_grpc));
        assert_eq!(rest.len(), over_grpc.len());
        for ((rest_id, rest_score), (grpc_id, grpc_score)) in rest.iter().zip(&over_grpc) {
            assert_eq!(rest_id, grpc_id);
            assert!((rest_score - grpc_score).abs() <= 1e-5, "{rest_score} vs {grpc_score}");
        }
    }
    for user in &names[..5] {
        let (status, rest) = server
            .post("/v1/interests", &json!({"user_id": user, "top": 3, "at": 40_000_000}))
            .await;
        assert_eq!(status, StatusCode::OK, "{rest}");
        let over_grpc = grpc
            .interests(pb::InterestsRequest {
                user_id: user.to_string(),
                top: Some(3),
                at: Some(40_000_000),
            })
            .await
            .unwrap()
            .into_inner();
        let rest_interests: BTreeMap<String, f32> = rest["interests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["category"].as_str().unwrap().to_owned(),
                    c["score"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        let grpc_interests: BTreeMap<String, f32> = over_grpc
            .interests
            .iter()
            .map(|c| (c.category.clone(), c.score))
            .collect();
        assert_eq!(grpc_interests, rest_interests);
    }

    // Erasure over gRPC is seen over REST; model info agrees.
    grpc.forget_user(pb::ForgetUserRequest {
        user_id: names[0].to_owned(),
    })
    .await
    .unwrap();
    let (status, _) = server.get(&format!("/v1/users/{}/history", names[0])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let info = grpc.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    let (_, model) = server.get("/v1/model").await;
    let model: Value = serde_json::from_str(&model).unwrap();
    assert_eq!(info.version, model["version"].as_str().unwrap());
    let config: Value = serde_json::from_str(&info.config_json).unwrap();
    assert_eq!(config, model["config"]);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_errors_arrive_as_grpc_codes_with_the_cores_own_code() {
    let server = server(&[]).await;
    let mut grpc = grpc_client(&server).await;
    let ask = |user: &str, k: u32| pb::RecommendRequest {
        user_id: user.to_owned(),
        k: Some(k),
        ..Default::default()
    };
    // The same validation as REST, with the same message.
    let refused = grpc.recommend(ask("u", 0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(xsrec_code(&refused), "invalid_request");
    let (status, rest) = server.post("/v1/recommend", &json!({"user_id": "u", "k": 0})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.message(), rest["error"]["message"].as_str().unwrap());
    let refused = grpc.recommend(ask(&"x".repeat(300), 5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let refused = grpc
        .ingest_events(pb::IngestEventsRequest {
            events: vec![event("u", "i", -1, None)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let missing = grpc
        .get_history(pb::GetHistoryRequest {
            user_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(xsrec_code(&missing), "user_not_found");
    let missing = grpc
        .forget_user(pb::ForgetUserRequest {
            user_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // A message over --max-body-bytes (1 MiB) is refused before it is decoded, as REST refuses
    // such a body, and nothing of it is stored.
    let huge = pb::IngestEventsRequest {
        events: (0..20_000)
            .map(|i| event("big", &format!("item-{i:060}"), 1, None))
            .collect(),
    };
    let refused = grpc.ingest_events(huge).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(xsrec_code(&refused), "message_too_large");
    let (status, _) = server.get("/v1/users/big/history").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A stream stops at its first bad message; the messages before it are stored.
    let stream = vec![
        pb::IngestEventsRequest {
            events: vec![event("streamed", "i1", 10, None)],
        },
        pb::IngestEventsRequest { events: vec![] },
        pb::IngestEventsRequest {
            events: vec![event("streamed", "i2", 20, None)],
        },
    ];
    let refused = grpc.ingest_event_stream(tokio_stream::iter(stream)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let (_, body) = server.get("/v1/users/streamed/history").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["events"].as_array().unwrap().len(), 1);

    // A client deadline shorter than any forward pass reaches the engine as DEADLINE_EXCEEDED.
    let fx = fixture();
    let user = &fx.events[0].user_id;
    let history: Vec<pb::Event> = users(&fx.events)[user.as_str()]
        .iter()
        .map(|e| event(user, &e.item_id, e.timestamp, None))
        .collect();
    grpc.ingest_events(pb::IngestEventsRequest { events: history })
        .await
        .unwrap();
    // tonic runs its own timer from the moment the headers arrive; when the message body comes
    // in a later read, that timer can fire while the body is still being decoded, before the
    // core sees the request, and the client hears CANCELLED "Timeout expired" instead. That race
    // is tonic's, so each try may lose it, but the core's answer must arrive in most of them.
    let mut from_core = 0;
    for _ in 0..5 {
        let mut hurried = tonic::Request::new(ask(user, 5));
        hurried.set_timeout(Duration::from_nanos(1));
        let late = grpc.recommend(hurried).await.unwrap_err();
        match late.code() {
            Code::DeadlineExceeded => {
                assert_eq!(xsrec_code(&late), "deadline_exceeded");
                from_core += 1;
            }
            _ => assert_eq!(
                (late.code(), late.message()),
                (Code::Cancelled, "Timeout expired"),
                "{late:?}"
            ),
        }
    }
    assert!(from_core >= 3, "the core answered {from_core} of 5 expired requests");
    // Without one, the same request is answered.
    grpc.recommend(ask(user, 5)).await.unwrap();
    server.shut_down().await.unwrap();
}

/// Any request message's field 1 (a string, or the events of an ingest) as raw bytes: an
/// encoded `pb::Event`, or anything.
#[derive(Clone, PartialEq, prost::Message)]
struct FieldOne {
    #[prost(bytes = "vec", repeated, tag = "1")]
    values: Vec<Vec<u8>>,
}

fn field_one(values: Vec<Vec<u8>>) -> FieldOne {
    FieldOne { values }
}

/// What tonic would answer on its own (INTERNAL for bytes that do not decode, OUT_OF_RANGE for
/// an oversized message, neither counted nor logged) gets a client's code, `xsrec-code`, the
/// request id and a count, as a handler's failures do; a stream keeps what came before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_do_not_decode_or_are_too_large_get_codes_and_counts() {
    let server = server(&["--max-body-bytes", "4000"]).await;
    let item = &fixture().events[0].item_id;
    let good = |user: &str, at: i64| prost::Message::encode_to_vec(&event(user, item, at, None));
    let (garbage, not_utf8) = (vec![0xff, 0xff, 0xff], vec![b'u', 0xfe]);
    let (recommend, ingest, stream) = (
        "/xsrec.v1.Recommender/Recommend",
        "/xsrec.v1.Recommender/IngestEvents",
        "/xsrec.v1.Recommender/IngestEventStream",
    );
    let sent = [
        (
            recommend,
            vec![field_one(vec![not_utf8])],
            Code::InvalidArgument,
            "malformed_message",
        ),
        (
            ingest,
            vec![field_one(vec![garbage.clone()])],
            Code::InvalidArgument,
            "malformed_message",
        ),
        (
            ingest,
            vec![field_one(vec![vec![b'x'; 5000]])],
            Code::ResourceExhausted,
            "message_too_large",
        ),
        // Two messages to a unary method: tonic would store the first and drop the second.
        (
            ingest,
            vec![field_one(vec![good("twice", 1)]), field_one(vec![good("twice", 2)])],
            Code::InvalidArgument,
            "malformed_message",
        ),
        // The second message of three does not decode: the stream ends there, the first is stored.
        (
            stream,
            vec![
                field_one(vec![good("streamed", 10)]),
                field_one(vec![good("streamed", 20), garbage]),
                field_one(vec![good("streamed", 30)]),
            ],
            Code::InvalidArgument,
            "malformed_message",
        ),
    ];
    let mut cases = Vec::new();
    for (method, messages, code, own) in sent {
        cases.push((
            method,
            common::grpc_call_with(&server, method, None, tokio_stream::iter(messages)).await,
            code,
            own,
        ));
    }
    for (method, refused, code, own) in &cases {
        assert_eq!(
            (refused.code(), xsrec_code(refused)),
            (*code, *own),
            "{method}: {refused:?}"
        );
        assert!(refused.metadata().get("x-request-id").is_some(), "{method}");
    }
    assert!(
        cases[0].1.message().starts_with("the request message does not decode"),
        "{:?}",
        cases[0].1
    );
    assert!(cases[2].1.message().contains("--max-body-bytes"), "{:?}", cases[2].1);
    let (_, body) = server.get("/v1/users/streamed/history").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(common::history_timestamps(&body), [10]);
    assert_eq!(server.get("/v1/users/twice/history").await.0, StatusCode::NOT_FOUND);
    let exposition = server.get("/metrics").await.1;
    let failures = |route: &str, reason: &str| failure_count(&exposition, route, reason);
    assert_eq!(failures("/xsrec.v1.Recommender/Recommend", "malformed_message"), 1.0);
    assert_eq!(failures("/xsrec.v1.Recommender/IngestEvents", "malformed_message"), 2.0);
    assert_eq!(failures("/xsrec.v1.Recommender/IngestEvents", "message_too_large"), 1.0);
    assert_eq!(
        failures("/xsrec.v1.Recommender/IngestEventStream", "malformed_message"),
        1.0
    );
    server.shut_down().await.unwrap();
}

/// A made-up method is answered like a wrong REST route (its code, the request id, counted
/// under `unmatched`); a unary call whose body stalls (inside its message or after it) is
/// answered after the body read timeout, as a REST body is; a gzipped request is read, a gzip bomb bounded like any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_stalled_messages_and_compressed_ones() {
    let server = server(&["--body-read-timeout-ms", "300", "--max-body-bytes", "4000"]).await;
    let unknown = common::grpc_call_with(
        &server,
        "/xsrec.v1.Recommender/NoSuchMethod",
        None,
        tokio_stream::iter([field_one(vec![])]),
    )
    .await;
    assert_eq!(
        (unknown.code(), xsrec_code(&unknown)),
        (Code::Unimplemented, "method_not_found")
    );
    assert!(unknown.metadata().get("x-request-id").is_some());

    // Nothing after the headers; or the whole message, then no end of stream (tonic reads a
    // unary body to its end before the handler runs, and would wait for good).
    type Messages = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = pb::RecommendRequest> + Send>>;
    let ask = pb::RecommendRequest {
        user_id: "u".into(),
        ..Default::default()
    };
    let stalls: [Messages; 2] = [
        Box::pin(tokio_stream::pending()),
        Box::pin(tokio_stream::StreamExt::chain(
            tokio_stream::iter([ask]),
            tokio_stream::pending(),
        )),
    ];
    for (i, messages) in stalls.into_iter().enumerate() {
        let started = std::time::Instant::now();
        let call = common::grpc_call_with(&server, "/xsrec.v1.Recommender/Recommend", None, messages);
        let stalled = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .unwrap_or_else(|_| panic!("stall {i} is answered"));
        assert_eq!(
            (stalled.code(), xsrec_code(&stalled)),
            (Code::DeadlineExceeded, "body_timeout"),
            "stall {i}: {stalled:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    let addr = server.running.grpc_addr.unwrap();
    let mut gzipped = RecommenderClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let item = &fixture().events[0].item_id;
    let reply = gzipped
        .ingest_events(pb::IngestEventsRequest {
            events: vec![event("zipped", item, 7, None)],
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().accepted, 1);
    // 100 events of long repeated ids: a few hundred bytes gzipped, over 4,000 unpacked.
    let bomb = pb::IngestEventsRequest {
        events: (0..100).map(|_| event("zipped", &"a".repeat(200), 8, None)).collect(),
    };
    let refused = gzipped.ingest_events(bomb).await.unwrap_err();
    assert_eq!(
        (refused.code(), xsrec_code(&refused)),
        (Code::ResourceExhausted, "message_too_large"),
        "{refused:?}"
    );
    let (_, history) = server.get("/v1/users/zipped/history").await;
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["events"].as_array().unwrap().len(), 1);

    let exposition = server.get("/metrics").await.1;
    let failures = |route: &str, reason: &str| failure_count(&exposition, route, reason);
    assert_eq!(failures("unmatched", "method_not_found"), 1.0);
    assert_eq!(failures("/xsrec.v1.Recommender/Recommend", "body_timeout"), 2.0);
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_says_serving_while_ready_and_reflection_lists_the_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let server = server(&[]).await;
    let addr = server.running.grpc_addr.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    // Readiness is polled every 100 ms: give it a few.
    let mut status = ServingStatus::Unknown;
    for _ in 0..50 {
        status = health
            .check(check("xsrec.v1.Recommender"))
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"xsrec.v1.Recommender".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_drives_grpc_and_counts_what_the_server_counts() {
    let server = server(&["--cache-capacity", "0"]).await;
    let addr = server.running.grpc_addr.unwrap().to_string();
    let target = xsrec::bench::load::Target::new(&server.base, 8)
        .unwrap()
        .over_grpc(&addr)
        .await
        .unwrap();
    common::check_load_generator(&server, target).await;
    server.shut_down().await.unwrap();
}
