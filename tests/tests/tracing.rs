//! One request is one trace across processes: a coordinator and two workers export OTLP to an
//! in-process trace receiver (a tonic server implementing the OTLP trace service), and the spans
//! of all three share one trace id with the expected parent links.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caravan_tests::{binary, serving_fixture};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue, KeyValue},
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| attributes(&r.attributes).get("service.name").cloned())
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent: span.parent_span_id.clone(),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_coordinator_and_workers() {
    let model = serving_fixture();
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut coordinator = tokio::process::Command::new(binary("caravan-coordinator"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--tp",
            "2",
            "--local-workers",
        ])
        .args(["--port", "0", "--otlp-endpoint", &endpoint])
        // Export within a fraction of a second, so the test does not wait on batching.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(coordinator.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("ready: serving serving on ") {
                return url.to_string();
            }
        }
        panic!("the coordinator exited before it was ready");
    })
    .await
    .expect("the coordinator was not ready within 120 s");

    // One request, through the operator CLI (a real HTTP client).
    let out = Command::new(binary("caravanctl"))
        .args([
            "--url",
            &url,
            "generate",
            "Hello world",
            "--max-tokens",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wait (with a deadline) until the request's spans from all three processes have arrived.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (trace, spans) = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let request = spans
            .iter()
            .find(|s| s.service == "caravan-coordinator" && s.name == "request");
        if let Some(request) = request {
            let trace: Vec<Received> = spans
                .iter()
                .filter(|s| s.trace_id == request.trace_id)
                .cloned()
                .collect();
            let ranks: std::collections::HashSet<String> = trace
                .iter()
                .filter(|s| s.name == "worker.step")
                .map(|s| s.attributes.get("rank").cloned().unwrap_or_default())
                .collect();
            if ranks.len() == 2 && trace.iter().filter(|s| s.name == "collective").count() >= 2 {
                break (request.clone(), trace);
            }
        }
        assert!(
            Instant::now() < deadline,
            "spans did not arrive: {:?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let by_id: HashMap<&[u8], &Received> =
        spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let parent_of = |s: &Received| by_id.get(s.parent.as_slice()).copied();
    assert!(trace.parent.is_empty(), "the request span is the root");

    let steps: Vec<&Received> = spans
        .iter()
        .filter(|s| s.service == "caravan-coordinator" && s.name == "step")
        .collect();
    assert!(!steps.is_empty(), "no coordinator step spans in the trace");
    for step in &steps {
        assert_eq!(step.parent, trace.span_id, "a step's parent is the request");
    }
    let queue = spans
        .iter()
        .find(|s| s.name == "queue")
        .expect("a queue span");
    assert_eq!(queue.parent, trace.span_id);

    for rank in ["0", "1"] {
        let worker_steps: Vec<&Received> = spans
            .iter()
            .filter(|s| {
                s.name == "worker.step"
                    && s.attributes.get("rank").map(String::as_str) == Some(rank)
            })
            .collect();
        assert_eq!(
            worker_steps.len(),
            steps.len(),
            "rank {rank} traced every step"
        );
        for ws in &worker_steps {
            assert_eq!(ws.service, "caravan-worker");
            let parent = parent_of(ws).expect("a worker step's parent is in the trace");
            assert_eq!(
                (parent.service.as_str(), parent.name.as_str()),
                ("caravan-coordinator", "step")
            );
        }
    }
    for forward in spans.iter().filter(|s| s.name == "forward") {
        assert_eq!(
            parent_of(forward).map(|p| p.name.as_str()),
            Some("worker.step")
        );
    }
    for collective in spans.iter().filter(|s| s.name == "collective") {
        assert_eq!(
            parent_of(collective).map(|p| p.name.as_str()),
            Some("forward")
        );
        assert_eq!(collective.service, "caravan-worker");
    }
    let _ = coordinator.start_kill();
}
