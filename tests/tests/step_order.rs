//! Steps sent before their predecessor has run (asynchronous scheduling): a real worker service
//! over gRPC runs them in `step_id` order, feeds each sequence the token it sampled last, and
//! answers exactly what the same steps sent one after another answer.

use std::sync::{Arc, Mutex};

use caravan_ops::comm::RingListener;
use caravan_proto::v1::{self as pb, worker_client::WorkerClient, worker_server::WorkerServer};
use caravan_tests::fixtures;
use caravan_worker::{
    runner::{ModelRunner, SharedStatus},
    service::{WorkerIdentity, WorkerService},
    step_order::StepOrder,
};
use tch::Device;
use tonic::transport::Channel;

const PROMPT: [i64; 3] = [1, 15043, 3186];

/// A worker service on a loopback port; its client and the order its steps run in.
async fn serve() -> (WorkerClient<Channel>, Arc<StepOrder>) {
    let status = SharedStatus::default();
    let ring = RingListener::bind("127.0.0.1:0").expect("binding a ring listener");
    let runner = Arc::new(Mutex::new(ModelRunner::new(
        Device::Cpu,
        ring,
        status.clone(),
        None,
    )));
    let service = WorkerService::new(
        runner,
        status,
        WorkerIdentity {
            host: "test".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            ring_addr: String::new(),
        },
    );
    let order = service.step_order();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, order)
}

async fn load(client: &mut WorkerClient<Channel>) {
    client
        .load_shard(pb::LoadShardRequest {
            model_path: fixtures().join("mha").display().to_string(),
            rank: 0,
            world_size: 1,
            dtype: pb::Dtype::F32.into(),
            block_size: 16,
            kv_cache_blocks: 8,
            collective_timeout_ms: 10_000,
            threads: 1,
            ..Default::default()
        })
        .await
        .expect("loading the MHA fixture");
}

/// Two sequences, one greedy and one sampled with a seed: step 0 prefills both, each later step
/// decodes one token of each, its input sent (`fed: false`) or fed by the rank.
fn step(step_id: u64, fed: bool, previous: &[i64]) -> pb::StepRequest {
    let sequences = (0..2u64)
        .map(|i| {
            let params = pb::SamplingParams {
                temperature: if i == 0 { 0.0 } else { 1.0 },
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 7,
                ..Default::default()
            };
            let first = step_id == 0;
            pb::SequenceStep {
                sequence_id: i + 1,
                tokens: match (first, fed) {
                    (true, _) => PROMPT.to_vec(),
                    (false, true) => vec![],
                    (false, false) => vec![previous[i as usize]],
                },
                start_position: if first {
                    0
                } else {
                    PROMPT.len() as u32 + step_id as u32 - 1
                },
                new_blocks: if first { vec![i as u32] } else { vec![] },
                admitted: first.then_some(params),
                prompt_len: if first { PROMPT.len() as u32 } else { 0 },
                sample: true,
                feeds_sampled: fed && !first,
                ..Default::default()
            }
        })
        .collect();
    pb::StepRequest {
        step_id,
        sequences,
        finished: vec![],
    }
}

fn tokens(answer: &pb::StepResponse) -> Vec<i64> {
    answer.tokens.iter().map(|t| t.token_id).collect()
}

/// Spawns step `request` and returns once the rank holds it waiting for its turn.
async fn send_early(
    client: &WorkerClient<Channel>,
    order: &StepOrder,
    request: pb::StepRequest,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::StepResponse>, tonic::Status>> {
    let before = order.waiting();
    let mut client = client.clone();
    let call = tokio::spawn(async move { client.step(request).await });
    while order.waiting() == before && !call.is_finished() {
        tokio::task::yield_now().await;
    }
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_sent_ahead_run_in_order_and_answer_as_steps_sent_one_by_one() {
    let (mut client, order) = serve().await;
    load(&mut client).await;
    // One after another, each with the tokens the last answered.
    let mut expected = Vec::new();
    let mut previous = vec![];
    for id in 0..4 {
        let answer = client.step(step(id, false, &previous)).await.unwrap();
        previous = tokens(answer.get_ref());
        expected.push(previous.clone());
    }

    // The same steps, the last three sent before the first and fed by the rank.
    load(&mut client).await;
    let mut early = Vec::new();
    for id in (1..4).rev() {
        early.push(send_early(&client, &order, step(id, true, &[])).await);
    }
    assert_eq!(order.waiting(), 3, "steps 1-3 wait for step 0");
    let first = client.step(step(0, true, &[])).await.unwrap();
    let mut got = vec![tokens(first.get_ref())];
    for call in early.into_iter().rev() {
        got.push(tokens(call.await.unwrap().unwrap().get_ref()));
    }
    assert_eq!(got, expected);
    assert_eq!(order.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_waiting_when_the_shard_is_loaded_again_is_refused() {
    let (mut client, order) = serve().await;
    load(&mut client).await;
    let waiting = send_early(&client, &order, step(1, true, &[])).await;
    load(&mut client).await;
    let refused = waiting.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("loaded again"), "{refused:?}");
    // The new shard counts from step 0.
    client.step(step(0, true, &[])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_with_nothing_sampled_cannot_be_fed() {
    let (mut client, _) = serve().await;
    load(&mut client).await;
    let mut prefill = step(0, true, &[]);
    for s in &mut prefill.sequences {
        // A non-final chunk: nothing is sampled.
        s.sample = false;
        s.next_token = Some(29871);
    }
    client.step(prefill).await.unwrap();
    let refused = client.step(step(1, true, &[])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("sampled none"), "{refused:?}");
}
