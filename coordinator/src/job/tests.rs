//! Job state-machine tests: the job's actions are delivered to per-worker inboxes, as the
//! service would send them on the session streams.

use std::cell::RefCell;
use std::collections::{BTreeMap as Map, VecDeque};
use std::rc::Rc;

use super::*;
use crate::job::GroupOptions;
use stackwise_common::config::{TrainingMode, TrainingSection};
use stackwise_proto::model::Capabilities;

/// Messages sent to one worker, in order.
#[derive(Clone, Default)]
struct Inbox(Rc<RefCell<VecDeque<pb::CoordinatorMessage>>>);

impl Inbox {
    fn try_recv(&mut self) -> Result<Result<pb::CoordinatorMessage, ()>, ()> {
        self.0.borrow_mut().pop_front().map(Ok).ok_or(())
    }
}

thread_local! {
    static INBOXES: RefCell<Map<String, Inbox>> = const { RefCell::new(Map::new()) };
}

/// Carry out the job's actions as the service would (sends only; no checkpoint lookups
/// happen in these tests).
fn deliver(actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::Send { to, message } => INBOXES.with(|b| {
                if let Some(inbox) = b.borrow().get(&to) {
                    inbox.0.borrow_mut().push_back(*message);
                }
            }),
            Action::FindCheckpoint => panic!("no checkpoint lookup expected"),
        }
    }
}

fn group(min: usize, max: usize, lease: Duration) -> GroupOptions {
    GroupOptions {
        min_workers: min,
        max_workers: max,
        lease,
        heartbeat: Duration::from_millis(100),
        rendezvous_grace: Duration::ZERO,
        resume: false,
        on_worker_loss: OnWorkerLoss::Stop,
        until_step: None,
    }
}

fn layerwise_spec(layers: usize, steps: u64, min: usize, max: usize) -> JobSpec {
    let t = TrainingSection {
        mode: TrainingMode::Layerwise,
        steps,
        ..Default::default()
    };
    let plan = stackwise_common::plan::plan(&t, layers).unwrap();
    JobSpec {
        run_id: "r".into(),
        config_yaml: "run: {name: r}".into(),
        plan,
        run_uri: String::new(),
        batch_size: 4,
        group: group(min, max, Duration::from_secs(60)),
    }
}

fn join(job: &mut Job, name: &str, now: Instant) -> (String, Inbox) {
    let reg = Registration {
        name: name.into(),
        capabilities: Capabilities {
            device_kind: DeviceKind::Cpu,
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            host: "localhost".into(),
            cpu_threads: 1,
        },
        ring_address: format!("127.0.0.1:{}", 7000 + name.len()),
    };
    let (id, secret) = job.register(reg, now).unwrap();
    let inbox = Inbox::default();
    INBOXES.with(|b| b.borrow_mut().insert(id.clone(), inbox.clone()));
    assert!(matches!(
        job.attach(&id, "not its secret", now),
        Err(ProtoError::WrongSessionSecret(_))
    ));
    let (_, actions) = job.attach(&id, &secret, now).unwrap();
    deliver(actions);
    (id, inbox)
}

/// The RunStage commands waiting in an inbox.
fn run_stages(inbox: &mut Inbox) -> Vec<RunStage> {
    let mut out = Vec::new();
    while let Ok(Ok(m)) = inbox.try_recv() {
        if let Ok((_, Command::RunStage(r))) = <(Fence, Command)>::try_from(m) {
            out.push(*r);
        }
    }
    out
}

fn stage_done(job: &mut Job, id: &str, step: u64, now: Instant) {
    let r = WorkerReport {
        fence: job.fence(),
        worker_id: id.into(),
        report: Report::StageDone(StageDone {
            stage: job.stage,
            step,
            train_loss: None,
            val_loss: None,
            last_checkpoint: Some(format!("step-{step:08}")),
            stopped_early: false,
            stopped_on_request: false,
        }),
    };
    deliver(job.on_report(r, now).unwrap());
}

#[test]
fn each_stage_is_a_generation_from_the_last_boundary_and_joiners_take_part_in_the_next() {
    let now = Instant::now();
    let mut job = Job::new(layerwise_spec(2, 4, 1, 2));
    job.log_events = false;
    let (a, mut inbox_a) = join(&mut job, "a", now);
    deliver(job.reconcile(now));
    let first = run_stages(&mut inbox_a);
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].stage, first[0].world_size, first[0].until_step),
        (0, 1, Some(2))
    );
    assert_eq!(first[0].resume_checkpoint, None);
    // A second worker joins while stage 1 trains: it waits for the next stage.
    let (b, mut inbox_b) = join(&mut job, "bb", now);
    deliver(job.reconcile(now));
    assert!(run_stages(&mut inbox_b).is_empty());
    stage_done(&mut job, &a, 2, now);
    deliver(job.reconcile(now));
    assert_eq!(job.generation, 2);
    for inbox in [&mut inbox_a, &mut inbox_b] {
        let next = run_stages(inbox);
        assert_eq!(next.len(), 1);
        assert_eq!(
            (next[0].stage, next[0].world_size, next[0].until_step),
            (1, 2, Some(4))
        );
        assert_eq!(next[0].resume_checkpoint.as_deref(), Some("step-00000002"));
    }
    assert_eq!(job.status(now).stage_name, "2/2 layer 1");
    stage_done(&mut job, &a, 4, now);
    assert_eq!(job.phase.name(), "running", "rank 1 is not done yet");
    stage_done(&mut job, &b, 4, now);
    deliver(job.reconcile(now));
    assert_eq!(job.phase, Phase::Finished);
}

#[test]
fn the_status_names_the_stage_rank_0_trains_from_the_plan() {
    let t = TrainingSection {
        mode: TrainingMode::Layerwise,
        steps: 4,
        ..Default::default()
    };
    let plan = stackwise_common::plan::plan(&t, 2).unwrap();
    let spec = JobSpec {
        run_id: "r".into(),
        config_yaml: String::new(),
        plan,
        run_uri: String::new(),
        batch_size: 1,
        group: group(1, 1, Duration::from_secs(1)),
    };
    let mut job = Job::new(spec);
    assert_eq!(job.stage_name(), "1/2 layer 0");
    job.stage = 1;
    assert_eq!(job.status(Instant::now()).stage_name, "2/2 layer 1");
}

#[test]
fn a_run_stage_never_carries_the_s3_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "do-not-send-this-secret";
    let yaml = format!(
        "run: {{name: r, output: {}}}\ndata: {{path: {}}}\ntraining: {{steps: 4, batch_size: 4, warmup_steps: 1}}\n\
         storage: {{endpoint: \"http://127.0.0.1:9\", access_key_id: k, secret_access_key: {secret}}}\n",
        dir.path().display(),
        dir.path().join("data").display()
    );
    let cfg: stackwise_common::config::TrainConfig = serde_yaml::from_str(&yaml).unwrap();
    let spec = crate::job::job_spec(cfg, group(1, 1, Duration::from_secs(60))).unwrap();
    assert!(!spec.config_yaml.contains(secret), "{}", spec.config_yaml);
    assert!(
        spec.config_yaml
            .contains(stackwise_common::store::SECRET_ENV)
    );
    let now = Instant::now();
    let mut job = Job::new(spec);
    job.log_events = false;
    let (_, mut inbox) = join(&mut job, "a", now);
    deliver(job.reconcile(now));
    let stages = run_stages(&mut inbox);
    assert_eq!(stages.len(), 1);
    assert!(!stages[0].config_yaml.contains(secret));
}

#[test]
fn at_300_workers_joins_are_one_log_line_each_rank_gets_only_its_next_hop_and_heartbeats_are_acked()
{
    let now = Instant::now();
    let n = 300;
    let mut spec = layerwise_spec(1, 4, n, n);
    spec.batch_size = n;
    let mut job = Job::new(spec);
    job.log_events = false;
    let mut workers = Vec::new();
    for i in 0..n {
        let reg = Registration {
            name: format!("sim-{i}"),
            capabilities: Capabilities {
                device_kind: DeviceKind::Cpu,
                device: "cpu".into(),
                memory_bytes: 1 << 30,
                host: "h".into(),
                cpu_threads: 1,
            },
            ring_address: format!("10.0.0.{}:{}", i % 250, 9000 + i),
        };
        let (id, secret) = job.register(reg, now).unwrap();
        let inbox = Inbox::default();
        INBOXES.with(|b| b.borrow_mut().insert(id.clone(), inbox.clone()));
        deliver(job.attach(&id, &secret, now).unwrap().1);
        workers.push((id, inbox));
    }
    deliver(job.reconcile(now));
    let joined: Vec<_> = job
        .events
        .iter()
        .filter(|e| e.contains("registered"))
        .collect();
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert!(joined[0].starts_with("300 workers registered: w00001 (sim-0 on h), "));
    let formed = job.events.last().unwrap();
    assert!(formed.contains("generation 1 formed") && formed.contains("... 292 more"));
    assert!(formed.len() < 400, "one short line: {formed}");
    for (rank, (_, inbox)) in workers.iter_mut().enumerate() {
        let rs = run_stages(inbox);
        assert_eq!(rs.len(), 1);
        let next = (rank + 1) % n;
        assert_eq!((rs[0].rank as usize, rs[0].world_size as usize), (rank, n));
        assert_eq!(
            rs[0].next_peer,
            format!("10.0.0.{}:{}", next % 250, 9000 + next)
        );
    }
    // A heartbeat renews the lease and is answered with its seq, to that worker only.
    let (id, inbox) = &mut workers[7];
    let hb = WorkerReport {
        fence: job.fence(),
        worker_id: id.clone(),
        report: Report::Heartbeat { step: 0, seq: 41 },
    };
    let actions = job.on_report(hb, now).unwrap();
    assert_eq!(actions.len(), 1);
    deliver(actions);
    let ack = <(Fence, Command)>::try_from(inbox.try_recv().unwrap().unwrap()).unwrap();
    assert_eq!(ack.1, Command::HeartbeatAck { seq: 41 });
}
