//! Dynamic batching, independent of what the model is: requests become jobs in a bounded queue; one
//! worker takes the oldest job, waits a short window for more, and runs every queued job with the
//! same compatibility key together (up to `max_batch` units, e.g. images) on a blocking thread.
//! Jobs whose client went away or whose deadline passed are skipped, never run; a running batch
//! is told which of its jobs are still wanted, so a model can stop work nobody waits for.
//!
//! A model plugs in by implementing [`BatchModel`]; each model gets its own [`Batcher`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::metrics::Metrics;
use crate::sample::denoiser::Cancelled;

/// A model that can run several compatible jobs at once. `run` is blocking (it computes).
pub trait BatchModel: Send + Sync + 'static {
    type Job: Send + 'static;
    type Output: Send + 'static;
    /// Jobs with equal keys may share a batch.
    type Key: PartialEq + Send + 'static;

    /// The metrics label, e.g. `image`.
    fn kind(&self) -> &'static str;
    fn key(&self, job: &Self::Job) -> Self::Key;
    /// The job's share of a batch (images for a text-to-image model).
    fn units(&self, job: &Self::Job) -> usize;
    /// The job's expected work in network evaluations at the model's native size (what
    /// `--max-request-cost` and `--max-queued-cost` bound).
    fn cost(&self, job: &Self::Job) -> f64;
    /// How [`cost`](Self::cost) is counted, for the error that refuses a request.
    fn cost_terms(&self) -> &'static str;
    /// One result per job, in order. `wanted(i)` says whether job i's client still waits (within
    /// its deadline, the server not aborting): a model checks it between steps and stops work
    /// that no job wants (the result of an unwanted job is never read).
    fn run(
        &self,
        jobs: Vec<Self::Job>,
        wanted: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<anyhow::Result<Self::Output>>;
}

/// The common shape of a model's `run`: every job is a list of items (images, motions); the items
/// of all jobs run in chunks of at most `max` through `run_chunk`, which gets `wanted(item)` for
/// the chunk's items (whether the item's job is still wanted) and returns an output per item, or
/// `None` for an item that left the chunk because its job stopped being wanted. A chunk no job
/// wants is skipped. Outputs are regrouped per job; a job with a failed chunk fails with its
/// error, one with an item left out is [`Cancelled`].
pub fn run_in_chunks<I, O>(
    jobs: &[Vec<I>],
    max: usize,
    wanted: &(dyn Fn(usize) -> bool + Sync),
    run_chunk: impl Fn(&[&I], &dyn Fn(usize) -> bool) -> anyhow::Result<Vec<Option<O>>>,
) -> Vec<anyhow::Result<Vec<O>>> {
    let items: Vec<(usize, &I)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, items)| items.iter().map(move |it| (j, it)))
        .collect();
    let mut out: Vec<anyhow::Result<Vec<O>>> = jobs.iter().map(|_| Ok(Vec::new())).collect();
    for chunk in items.chunks(max.max(1)) {
        let mut owners: Vec<usize> = chunk.iter().map(|(j, _)| *j).collect();
        owners.dedup();
        if !owners.iter().any(|&j| wanted(j)) {
            for &j in &owners {
                out[j] = Err(Cancelled.into());
            }
            continue;
        }
        let chunk_items: Vec<&I> = chunk.iter().map(|(_, it)| *it).collect();
        match run_chunk(&chunk_items, &|i| wanted(chunk[i].0)) {
            Ok(made) => {
                for ((j, _), o) in chunk.iter().zip(made) {
                    match (o, &mut out[*j]) {
                        (Some(o), Ok(v)) => v.push(o),
                        (None, slot @ Ok(_)) => *slot = Err(Cancelled.into()),
                        (_, Err(_)) => {}
                    }
                }
            }
            Err(e) => {
                let cancelled = e.is::<Cancelled>();
                let msg = format!("{e:#}");
                for &j in &owners {
                    out[j] = Err(if cancelled {
                        Cancelled.into()
                    } else {
                        anyhow::anyhow!("{msg}")
                    });
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most units per batch; 1 turns batching off.
    pub max_batch: usize,
    /// Most jobs waiting (not yet running).
    pub max_queue: usize,
    /// Most total [`BatchModel::cost`] waiting.
    pub max_queued_cost: f64,
    /// How long the worker waits after the first job for compatible ones to arrive.
    pub window: Duration,
}

/// Why a submitted job produced no output.
#[derive(Debug)]
pub enum JobError {
    /// The deadline passed while the job waited.
    Expired,
    /// The model failed (not the request's fault: it was validated before queueing).
    Failed(String),
    /// The server stopped before the job ran.
    ShuttingDown,
}

#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full; try again after this many seconds.
    QueueFull {
        retry_after_s: u64,
    },
    /// The work ahead of this job would take it past its deadline; try again after this long.
    TooBusy {
        retry_after_s: u64,
    },
    /// Alone, this job would take longer than its deadline allows (at the pace measured).
    TooSlow {
        seconds: f64,
    },
    ShuttingDown,
}

pub type Reply<M> = oneshot::Receiver<Result<<M as BatchModel>::Output, JobError>>;

struct Pending<M: BatchModel> {
    job: M::Job,
    key: M::Key,
    units: usize,
    cost: f64,
    deadline: Instant,
    tx: oneshot::Sender<Result<M::Output, JobError>>,
}

struct Shared<M: BatchModel> {
    model: Arc<M>,
    cfg: BatchConfig,
    queue: Mutex<VecDeque<Pending<M>>>,
    notify: Notify,
    closing: AtomicBool,
    /// Set when a shutdown's grace period is over: running work stops, queued work is refused.
    aborting: AtomicBool,
    metrics: Arc<Metrics>,
    /// Exponential average of a batch's run time, microseconds (for Retry-After).
    avg_batch_us: AtomicU64,
    /// Seconds per unit of cost (exponential average over finished batches; 0 until one has
    /// run) and the cost of the batch running now: how long the work ahead of a new job takes.
    pace: Mutex<(f64, f64)>,
}

pub struct Batcher<M: BatchModel> {
    shared: Arc<Shared<M>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<M: BatchModel> Batcher<M> {
    /// Start the worker on the current tokio runtime.
    pub fn start(model: Arc<M>, cfg: BatchConfig, metrics: Arc<Metrics>) -> Self {
        let shared = Arc::new(Shared {
            model,
            cfg: BatchConfig {
                max_batch: cfg.max_batch.max(1),
                ..cfg
            },
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closing: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            metrics,
            avg_batch_us: AtomicU64::new(0),
            pace: Mutex::new((0.0, 0.0)),
        });
        shared.metrics.set_queue_depth(shared.model.kind(), 0);
        let worker = tokio::spawn(worker(shared.clone()));
        Self {
            shared,
            worker: Mutex::new(Some(worker)),
        }
    }

    pub fn model(&self) -> &Arc<M> {
        &self.shared.model
    }

    /// Queue a job; the reply arrives when its batch has run.
    pub fn submit(&self, job: M::Job, deadline: Instant) -> Result<Reply<M>, SubmitError> {
        let s = &self.shared;
        if s.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let (tx, rx) = oneshot::channel();
        let key = s.model.key(&job);
        let units = s.model.units(&job);
        let cost = s.model.cost(&job);
        let mut q = lock(&s.queue);
        // Jobs of clients that left do not hold places in the queue.
        let before = q.len();
        q.retain(|p| !p.tx.is_closed());
        for _ in q.len()..before {
            s.metrics.dropped(s.model.kind(), "disconnected");
        }
        let queued_cost: f64 = q.iter().map(|p| p.cost).sum();
        // An empty queue always takes a job (its own cost was checked against the request cap).
        let over_cost = !q.is_empty() && queued_cost + cost > s.cfg.max_queued_cost;
        if q.len() >= s.cfg.max_queue || over_cost {
            let batches = (q.len() / s.cfg.max_batch + 1) as u64;
            let avg_us = s.avg_batch_us.load(Ordering::Relaxed);
            let retry_after_s = (batches * avg_us).div_ceil(1_000_000).max(1);
            s.metrics.set_queue_depth(s.model.kind(), q.len());
            return Err(SubmitError::QueueFull { retry_after_s });
        }
        // At the pace measured so far, would the work ahead (running and queued) and this job's
        // own finish before its deadline? If not, say so now instead of a 504 later.
        let (secs_per_cost, running) = *lock(&s.pace);
        if secs_per_cost == 0.0 {
            // No batch has finished yet, so the pace is unknown: queue one batch's worth at most
            // (the first burst still batches) rather than work that may all miss its deadline.
            let queued_units: usize = q.iter().map(|p| p.units).sum();
            if running > 0.0 && queued_units + units > s.cfg.max_batch {
                s.metrics.set_queue_depth(s.model.kind(), q.len());
                return Err(SubmitError::TooBusy { retry_after_s: 1 });
            }
        } else {
            let own = cost * secs_per_cost;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            if own > left {
                return Err(SubmitError::TooSlow { seconds: own });
            }
            let ahead = (running + queued_cost) * secs_per_cost;
            // A margin: the other model's batches share the cores, and the pace varies.
            if 1.25 * (ahead + own) > left {
                s.metrics.set_queue_depth(s.model.kind(), q.len());
                return Err(SubmitError::TooBusy {
                    retry_after_s: (ahead.ceil() as u64).max(1),
                });
            }
        }
        q.push_back(Pending {
            job,
            key,
            units,
            cost,
            deadline,
            tx,
        });
        s.metrics.set_queue_depth(s.model.kind(), q.len());
        drop(q);
        s.notify.notify_one();
        Ok(rx)
    }

    /// Stop the running batch at its next step and answer every queued job "shutting down" (the
    /// end of a shutdown's grace period).
    pub fn abort(&self) {
        self.shared.aborting.store(true, Ordering::SeqCst);
        self.shared.closing.store(true, Ordering::SeqCst);
        let mut q = lock(&self.shared.queue);
        for p in q.drain(..) {
            let _ = p.tx.send(Err(JobError::ShuttingDown));
        }
        self.shared.notify.notify_one();
    }

    /// Stop taking jobs, let the worker finish what is queued, and wait for it.
    pub async fn shutdown(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.notify.notify_one();
        let worker = lock(&self.worker).take();
        if let Some(w) = worker {
            let _ = w.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove jobs that can no longer be answered, counting them.
fn prune<M: BatchModel>(s: &Shared<M>, q: &mut VecDeque<Pending<M>>) {
    let now = Instant::now();
    let kind = s.model.kind();
    let mut kept = VecDeque::with_capacity(q.len());
    for p in q.drain(..) {
        // The deadline first: a client whose deadline passed has given up (and hung up) too.
        if p.deadline <= now {
            s.metrics.dropped(kind, "deadline");
            let _ = p.tx.send(Err(JobError::Expired));
        } else if p.tx.is_closed() {
            s.metrics.dropped(kind, "disconnected");
        } else {
            kept.push_back(p);
        }
    }
    *q = kept;
}

async fn worker<M: BatchModel>(s: Arc<Shared<M>>) {
    let kind = s.model.kind();
    loop {
        // Wait for a live job (or for shutdown with an empty queue).
        let first = loop {
            let notified = s.notify.notified();
            {
                let mut q = lock(&s.queue);
                prune(&s, &mut q);
                s.metrics.set_queue_depth(kind, q.len());
                if !q.is_empty() {
                    break q.front().map(|p| p.units).unwrap_or(0);
                }
                if s.closing.load(Ordering::SeqCst) {
                    return;
                }
            }
            notified.await;
        };
        if first < s.cfg.max_batch && !s.cfg.window.is_zero() {
            tokio::time::sleep(s.cfg.window).await;
        }
        let batch = {
            let mut q = lock(&s.queue);
            prune(&s, &mut q);
            let mut batch: Vec<Pending<M>> = Vec::new();
            let mut units = 0;
            let mut rest = VecDeque::with_capacity(q.len());
            for p in q.drain(..) {
                let fits = match batch.first() {
                    None => true,
                    Some(b) => p.key == b.key && units + p.units <= s.cfg.max_batch,
                };
                if fits {
                    units += p.units;
                    batch.push(p);
                } else {
                    rest.push_back(p);
                }
            }
            *q = rest;
            s.metrics.set_queue_depth(kind, q.len());
            batch
        };
        if batch.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = batch.iter().map(|p| p.units).collect();
        let units: usize = sizes.iter().sum();
        let deadlines: Vec<Instant> = batch.iter().map(|p| p.deadline).collect();
        let batch_cost: f64 = batch.iter().map(|p| p.cost).sum();
        lock(&s.pace).1 = batch_cost;
        let (jobs, txs): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.job, p.tx)).unzip();
        let model = s.model.clone();
        let shared = s.clone();
        let t = Instant::now();
        // The senders go along to say which jobs are still wanted, and come back to answer.
        let ran = tokio::task::spawn_blocking(move || {
            let wanted = |i: usize| {
                !shared.aborting.load(Ordering::Relaxed)
                    && txs.get(i).is_some_and(|tx| !tx.is_closed())
                    && deadlines.get(i).is_some_and(|d| Instant::now() < *d)
            };
            let results =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(jobs, &wanted)));
            (results, txs)
        })
        .await;
        let (results, txs) = match ran {
            Ok(r) => r,
            // The closure catches the model's panics; this is only a cancelled blocking task.
            Err(_) => {
                lock(&s.pace).1 = 0.0;
                continue;
            }
        };
        let secs = t.elapsed().as_secs_f64();
        s.metrics.batch(kind, units, secs);
        {
            // Only batches that ran to their end say how long work takes.
            let finished = matches!(&results, Ok(r) if r.iter().all(|r| r.is_ok()));
            let mut pace = lock(&s.pace);
            if finished && batch_cost > 0.0 {
                let now = secs / batch_cost;
                pace.0 = if pace.0 == 0.0 {
                    now
                } else {
                    0.75 * pace.0 + 0.25 * now
                };
            }
            pace.1 = 0.0;
        }
        let prev = s.avg_batch_us.load(Ordering::Relaxed);
        let now_us = (secs * 1e6) as u64;
        let avg = if prev == 0 {
            now_us
        } else {
            (prev * 7 + now_us) / 8
        };
        s.avg_batch_us.store(avg, Ordering::Relaxed);
        match results {
            Ok(results) => {
                let made: usize = results
                    .iter()
                    .zip(&sizes)
                    .filter(|(r, _)| r.is_ok())
                    .map(|(_, n)| n)
                    .sum();
                s.metrics.generated(kind, made);
                for (tx, r) in txs.into_iter().zip(results) {
                    let r = match r {
                        Ok(out) => Ok(out),
                        // Stopped mid-run: its client left, its deadline passed or the server
                        // is aborting; nobody reads the answer.
                        Err(e) if e.is::<crate::sample::denoiser::Cancelled>() => {
                            s.metrics.dropped(kind, "cancelled");
                            Err(JobError::ShuttingDown)
                        }
                        Err(e) => Err(JobError::Failed(format!("{e:#}"))),
                    };
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                // The model panicked: answer everyone in the batch and keep serving.
                let what = e
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                for tx in txs {
                    let _ = tx.send(Err(JobError::Failed(format!("model panicked: {what}"))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model that records which jobs ran together: jobs are (key, units, id).
    struct Recorder {
        batches: Mutex<Vec<Vec<u32>>>,
    }

    impl BatchModel for Recorder {
        type Job = (u32, usize, u32);
        type Output = u32;
        type Key = u32;

        fn kind(&self) -> &'static str {
            "test"
        }
        fn key(&self, job: &Self::Job) -> u32 {
            job.0
        }
        fn units(&self, job: &Self::Job) -> usize {
            job.1
        }
        fn cost(&self, job: &Self::Job) -> f64 {
            job.1 as f64
        }
        fn cost_terms(&self) -> &'static str {
            "units"
        }
        fn run(
            &self,
            jobs: Vec<Self::Job>,
            _wanted: &(dyn Fn(usize) -> bool + Sync),
        ) -> Vec<anyhow::Result<u32>> {
            lock(&self.batches).push(jobs.iter().map(|j| j.2).collect());
            jobs.iter().map(|j| Ok(j.2)).collect()
        }
    }

    fn start(
        max_batch: usize,
        max_queue: usize,
    ) -> (Batcher<Recorder>, Arc<Recorder>, Arc<Metrics>) {
        let model = Arc::new(Recorder {
            batches: Mutex::new(Vec::new()),
        });
        let metrics = Arc::new(Metrics::default());
        let cfg = BatchConfig {
            max_batch,
            max_queue,
            max_queued_cost: 1e9,
            window: Duration::from_millis(100),
        };
        (
            Batcher::start(model.clone(), cfg, metrics.clone()),
            model,
            metrics,
        )
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn compatible_jobs_share_a_batch_up_to_max_batch_in_arrival_order() {
        let (b, model, metrics) = start(4, 16);
        let jobs = [(1, 1, 10), (2, 1, 20), (1, 2, 30), (1, 2, 40)];
        let replies: Vec<_> = jobs
            .iter()
            .map(|j| b.submit(*j, later()).unwrap())
            .collect();
        for (r, j) in replies.into_iter().zip(jobs) {
            assert_eq!(r.await.unwrap().unwrap(), j.2);
        }
        // 10 and 30 share key 1 (3 units; 40 would make 5 > 4); then the oldest left, 20; then 40.
        assert_eq!(
            *lock(&model.batches),
            vec![vec![10, 30], vec![20], vec![40]]
        );
        assert!(metrics
            .render()
            .contains("lcm_batch_size_sum{model=\"test\"} 6"));
        b.shutdown().await;
    }

    #[tokio::test]
    async fn jobs_of_departed_clients_and_past_deadlines_never_run() {
        let (b, model, metrics) = start(8, 16);
        let kept = b.submit((1, 1, 1), later()).unwrap();
        drop(b.submit((1, 1, 2), later()).unwrap());
        let expired = b.submit((1, 1, 3), Instant::now()).unwrap();
        assert_eq!(kept.await.unwrap().unwrap(), 1);
        assert!(matches!(expired.await.unwrap(), Err(JobError::Expired)));
        assert_eq!(*lock(&model.batches), vec![vec![1]]);
        let text = metrics.render();
        assert!(text.contains("reason=\"disconnected\"} 1"), "{text}");
        assert!(text.contains("reason=\"deadline\"} 1"), "{text}");
        b.shutdown().await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_shutdown_runs_what_is_queued() {
        let (b, model, _) = start(8, 2);
        let first = b.submit((1, 1, 1), later()).unwrap();
        let second = b.submit((1, 1, 2), later()).unwrap();
        // Still in the batching window: both wait in the queue.
        assert!(matches!(
            b.submit((1, 1, 3), later()),
            Err(SubmitError::QueueFull { retry_after_s }) if retry_after_s >= 1
        ));
        b.shutdown().await;
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert!(matches!(
            b.submit((1, 1, 4), later()),
            Err(SubmitError::ShuttingDown)
        ));
        assert_eq!(*lock(&model.batches), vec![vec![1, 2]]);
    }

    #[test]
    fn chunks_nobody_wants_are_skipped_or_stopped_and_outputs_regrouped() {
        let jobs = vec![vec![1, 2], vec![3], vec![4, 5, 6]];
        let ran = Mutex::new(Vec::new());
        // Job 0 is gone; chunks of two: [1 2] skipped, [3 4] runs (job 1 wants it), [5 6] runs.
        let out = run_in_chunks(&jobs, 2, &|j| j != 0, |chunk, wanted| {
            assert!((0..chunk.len()).all(wanted));
            lock(&ran).push(chunk.iter().map(|&&x| x).collect::<Vec<i32>>());
            Ok(chunk.iter().map(|&&x| Some(x * 10)).collect())
        });
        assert_eq!(*lock(&ran), vec![vec![3, 4], vec![5, 6]]);
        assert!(out[0]
            .as_ref()
            .is_err_and(|e| e.is::<crate::sample::denoiser::Cancelled>()));
        assert_eq!(out[1].as_ref().unwrap(), &vec![30]);
        assert_eq!(out[2].as_ref().unwrap(), &vec![40, 50, 60]);
        // A chunk that fails fails each of its jobs, keeping a cancellation recognisable.
        let out = run_in_chunks(
            &jobs,
            8,
            &|_| true,
            |_, _| -> anyhow::Result<Vec<Option<i32>>> {
                Err(crate::sample::denoiser::Cancelled.into())
            },
        );
        assert!(out.iter().all(|r| r
            .as_ref()
            .is_err_and(|e| e.is::<crate::sample::denoiser::Cancelled>())));
        // Items that left a running chunk (job 1 went while it ran) cancel their job only; the
        // chunk's wanted(i) answers for item i's job.
        let out = run_in_chunks(&jobs, 8, &|j| j != 1, |chunk, wanted| {
            assert_eq!(
                (0..chunk.len()).map(wanted).collect::<Vec<_>>(),
                [true, true, false, true, true, true]
            );
            Ok(chunk
                .iter()
                .enumerate()
                .map(|(i, &&x)| wanted(i).then_some(x))
                .collect())
        });
        assert_eq!(out[0].as_ref().unwrap(), &vec![1, 2]);
        assert!(out[1]
            .as_ref()
            .is_err_and(|e| e.is::<crate::sample::denoiser::Cancelled>()));
        assert_eq!(out[2].as_ref().unwrap(), &vec![4, 5, 6]);
    }
}
