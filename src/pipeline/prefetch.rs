//! Reading ahead: a background thread reads the tensors of the next step while the engine
//! works on the current ones, so disk time hides behind compute instead of adding to it.
//!
//! Jobs are read strictly in the order given, one job ahead of the consumer (a rendezvous
//! channel): at most two jobs' buffers exist at once, plus the one being read, which keeps
//! memory bounded by three times the largest job. [`Prefetch::start_bounded`] bounds it by
//! bytes too: a job is read only while the jobs read and not yet released (the consumer
//! releases a job by asking for the next) fit in the budget with it, or when none is held
//! (one job is always allowed). Buffers handed back with [`Prefetch::recycle`] are reused, so
//! steady state allocates nothing.

use crate::checkpoint::direct::TensorBuf;
use crate::checkpoint::reader::{Checkpoint, TensorEntry};
use crate::error::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Buffers larger than this are freed rather than kept for later reads: a model's few huge
/// tensors (embedding and head: 262 MB for LLaMA-2-7B, 328 MB for 13B) would otherwise keep
/// their memory for the many smaller ones read after them (the largest MLP matrix of 13B
/// takes 142 MB), beyond the read-ahead budget. Fresh memory costs a page fault per page, so
/// the bound sits above the common sizes.
pub const SPARE_MAX_BYTES: usize = 256 << 20;

/// One tensor to read whole.
pub struct TensorRead {
    /// The checkpoint that holds it.
    pub ckpt: Arc<Checkpoint>,
    /// The tensor.
    pub tensor: TensorEntry,
}

/// The tensors of one step, read together and delivered together.
pub type ReadJob = Vec<TensorRead>;

/// Bytes of the jobs read (or being read) and not yet released by the consumer.
#[derive(Default)]
struct Held {
    /// The bytes held, and whether the consumer is gone.
    state: Mutex<(u64, bool)>,
    released: Condvar,
}

impl Held {
    /// Waits until `bytes` more fit in `budget` (or nothing is held), then holds them; false
    /// when the consumer is gone.
    fn reserve(&self, bytes: u64, budget: u64) -> bool {
        let mut s = self.state.lock().expect("read-ahead lock");
        while !s.1 && s.0 > 0 && s.0 + bytes > budget {
            s = self.released.wait(s).expect("read-ahead lock");
        }
        s.0 += bytes;
        !s.1
    }

    /// Releases `bytes`; with `close`, also wakes the reader for good.
    fn release(&self, bytes: u64, close: bool) {
        let mut s = self.state.lock().expect("read-ahead lock");
        s.0 -= bytes.min(s.0);
        s.1 |= close;
        self.released.notify_all();
    }
}

/// One job as the reader hands it over: its bytes and its buffers.
type LoadedJob<B> = Result<(u64, Vec<B>)>;

/// A buffer the reader thread fills with one whole tensor: a `Vec<u8>` (read through the
/// page cache), or a [`TensorBuf`] (read past it when the tensor is large and not cached).
pub trait ReadBuffer: Default + Send + std::ops::Deref<Target = [u8]> + 'static {
    /// Reads tensor `t` of `ckpt` into the buffer (its memory reused).
    fn read(&mut self, ckpt: &Checkpoint, t: &TensorEntry) -> Result<()>;
    /// Bytes of memory it holds.
    fn capacity(&self) -> usize;
}

impl ReadBuffer for Vec<u8> {
    fn read(&mut self, ckpt: &Checkpoint, t: &TensorEntry) -> Result<()> {
        ckpt.read_tensor(t, self)
    }
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
}

impl ReadBuffer for TensorBuf {
    fn read(&mut self, ckpt: &Checkpoint, t: &TensorEntry) -> Result<()> {
        ckpt.read_tensor_into(t, self)
    }
    fn capacity(&self) -> usize {
        TensorBuf::capacity(self)
    }
}

/// A reader thread working through a list of [`ReadJob`]s into buffers of type `B`.
pub struct Prefetch<B: ReadBuffer = Vec<u8>> {
    loaded: Option<Receiver<LoadedJob<B>>>,
    held: Arc<Held>,
    /// Bytes of the job the consumer has now (released when it asks for the next).
    consumer_bytes: u64,
    spare: Sender<B>,
    /// Buffers waiting in `spare`, kept at most `spare_limit`.
    spare_count: Arc<AtomicUsize>,
    spare_limit: usize,
    thread: Option<JoinHandle<()>>,
}

impl<B: ReadBuffer> Prefetch<B> {
    /// Starts reading `jobs` in order.
    pub fn start(jobs: Vec<ReadJob>) -> Prefetch<B> {
        Self::start_bounded(jobs, u64::MAX)
    }

    /// Starts reading `jobs` in order, holding at most `budget` bytes of them at once (but
    /// always one job, however large).
    pub fn start_bounded(jobs: Vec<ReadJob>, budget: u64) -> Prefetch<B> {
        let (loaded_tx, loaded_rx) = sync_channel(0);
        let held = Arc::new(Held::default());
        let reader_held = held.clone();
        let (spare_tx, spare_rx) = channel::<B>();
        let spare_count = Arc::new(AtomicUsize::new(0));
        let spare_limit = 2 * jobs.iter().map(Vec::len).max().unwrap_or(0);
        let taken = spare_count.clone();
        let thread = std::thread::Builder::new()
            .name("udelta-read".into())
            .spawn(move || {
                for job in jobs {
                    let bytes: u64 = job.iter().map(|r| r.tensor.len).sum();
                    if !reader_held.reserve(bytes, budget) {
                        return;
                    }
                    let mut bufs = Vec::with_capacity(job.len());
                    let mut result = Ok(());
                    for r in &job {
                        let mut buf = match spare_rx.try_recv() {
                            Ok(b) => {
                                taken.fetch_sub(1, Ordering::Relaxed);
                                b
                            }
                            Err(_) => B::default(),
                        };
                        result = buf.read(&r.ckpt, &r.tensor);
                        bufs.push(buf);
                        if result.is_err() {
                            break;
                        }
                    }
                    let failed = result.is_err();
                    if loaded_tx.send(result.map(|()| (bytes, bufs))).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the reader thread");
        Prefetch {
            loaded: Some(loaded_rx),
            held,
            consumer_bytes: 0,
            spare: spare_tx,
            spare_count,
            spare_limit,
            thread: Some(thread),
        }
    }

    /// The buffers of the next job, one per tensor in the job's order (blocks until read).
    /// The consumer is then done with the previous job: its bytes no longer count.
    pub fn next_job(&mut self) -> Result<Vec<B>> {
        self.held
            .release(std::mem::take(&mut self.consumer_bytes), false);
        let (bytes, bufs) = self
            .loaded
            .as_ref()
            .and_then(|rx| rx.recv().ok())
            .unwrap_or_else(|| {
                Err(crate::error::Error::Param(
                    "internal: the reader thread ended early".into(),
                ))
            })?;
        self.consumer_bytes = bytes;
        Ok(bufs)
    }

    /// Hands buffers back for reuse by later reads. The pool keeps at most two jobs' worth;
    /// buffers beyond that (e.g. output buffers of steps that read nothing) are freed, so
    /// memory stays bounded however many steps there are.
    pub fn recycle(&self, bufs: impl IntoIterator<Item = B>) {
        // Buffers without capacity are not worth a slot: a reader taking one would allocate
        // anew while a real buffer waited behind it. Huge ones are freed.
        for b in bufs
            .into_iter()
            .filter(|b| b.capacity() > 0 && b.capacity() <= SPARE_MAX_BYTES)
        {
            if self.spare_count.load(Ordering::Relaxed) >= self.spare_limit {
                return;
            }
            // The reader may have finished; then the buffer is simply freed.
            if self.spare.send(b).is_ok() {
                self.spare_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<B: ReadBuffer> Drop for Prefetch<B> {
    fn drop(&mut self) {
        // Closing the channel stops the reader at its next send; wait for it so no read
        // outlives the pass that asked for it (waking it if it waits for room).
        self.loaded.take();
        self.held.release(0, true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::Dtype;
    use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};

    /// A checkpoint of `n` f32 tensors `t{i}` of 1000 elements, every element of `t{i}` = i.
    fn checkpoint(dir: &std::path::Path, n: usize) -> Arc<Checkpoint> {
        let path = dir.join("model.safetensors");
        let headers: Vec<TensorHeader> = (0..n)
            .map(|i| TensorHeader {
                name: format!("t{i}"),
                dtype: Dtype::F32,
                shape: vec![1000],
            })
            .collect();
        let mut w = SafetensorsWriter::create(&path, &headers, None).unwrap();
        for i in 0..n {
            w.write(bytemuck::cast_slice(&[i as f32; 1000])).unwrap();
        }
        w.finish().unwrap();
        Arc::new(Checkpoint::open(&path).unwrap())
    }

    #[test]
    fn jobs_arrive_in_order_and_buffers_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 40);
        let read = |i: usize| TensorRead {
            ckpt: ckpt.clone(),
            tensor: ckpt.get(&format!("t{i}")).unwrap().clone(),
        };
        // Pairs of tensors, with an empty job after every pair (as for tensors no model
        // compresses): empty jobs must not make the reader allocate afresh.
        let jobs: Vec<ReadJob> = (0..20)
            .flat_map(|k| [vec![read(2 * k), read(2 * k + 1)], vec![]])
            .collect();
        let mut p = Prefetch::<Vec<u8>>::start(jobs);
        let mut seen = std::collections::HashSet::new();
        for k in 0..20 {
            let bufs = p.next_job().unwrap();
            assert_eq!(bufs.len(), 2);
            for (j, b) in bufs.iter().enumerate() {
                let want = (2 * k + j) as f32;
                assert!(bytemuck::cast_slice::<u8, f32>(b)
                    .iter()
                    .all(|&v| v == want));
                // Buffers the reader allocated (the recycled foreign ones below are larger).
                if b.capacity() == 4000 {
                    seen.insert(b.as_ptr() as usize);
                }
            }
            p.recycle(bufs);
            let empty = p.next_job().unwrap();
            assert!(empty.is_empty());
            // Steps that read nothing may still hand buffers back (decompress recycles the
            // output of raw tensors): the pool must not grow with them.
            p.recycle(empty.into_iter().chain([Vec::new(), vec![0u8; 5000]]));
            assert!(p.spare_count.load(Ordering::Relaxed) <= p.spare_limit);
        }
        // One job held here, one waiting in the channel, one being read: the reader allocates
        // at most 6 buffers; after that it reuses (its own or recycled foreign ones). Which
        // foreign buffers the pool takes depends on timing, so they are not counted.
        assert!(
            seen.len() <= 6,
            "the reader allocated {} buffers for 40 reads",
            seen.len()
        );
    }

    /// One job per tensor `t0` .. `t{n-1}` of `ckpt`.
    fn one_tensor_jobs(ckpt: &Arc<Checkpoint>, n: usize) -> Vec<ReadJob> {
        (0..n)
            .map(|i| {
                vec![TensorRead {
                    ckpt: ckpt.clone(),
                    tensor: ckpt.get(&format!("t{i}")).unwrap().clone(),
                }]
            })
            .collect()
    }

    #[test]
    fn huge_buffers_are_freed_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 2);
        let jobs = one_tensor_jobs(&ckpt, 2);
        // A budget of one byte: while the first job is held, the reader waits before the
        // second (it takes no spare buffer meanwhile).
        let mut p = Prefetch::<Vec<u8>>::start_bounded(jobs, 1);
        let _held = p.next_job().unwrap();
        // Capacity only (untouched memory): one over the bound, one at it.
        p.recycle([Vec::with_capacity(SPARE_MAX_BYTES + 1)]);
        assert_eq!(p.spare_count.load(Ordering::Relaxed), 0);
        p.recycle([Vec::with_capacity(SPARE_MAX_BYTES)]);
        assert_eq!(p.spare_count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_byte_budget_holds_the_reader_back_but_always_allows_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 3);
        let jobs = one_tensor_jobs(&ckpt, 3);
        // A budget below one job (4,000 bytes): nothing is read ahead of the consumer, yet
        // every job comes.
        let mut p = Prefetch::<Vec<u8>>::start_bounded(jobs, 1);
        for i in 0..3u64 {
            let bufs = p.next_job().unwrap();
            assert!(bytemuck::cast_slice::<u8, f32>(&bufs[0])
                .iter()
                .all(|&v| v == i as f32));
            // Unbounded, the reader would now read job i + 1 and wait to hand it over.
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(ckpt.bytes_read(), 4000 * (i + 1), "job {i}");
        }
    }

    #[test]
    fn a_failed_read_is_reported_and_ends_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 2);
        let mut bogus = ckpt.get("t1").unwrap().clone();
        bogus.offset += 1 << 30;
        let jobs = vec![
            vec![TensorRead {
                ckpt: ckpt.clone(),
                tensor: ckpt.get("t0").unwrap().clone(),
            }],
            vec![TensorRead {
                ckpt: ckpt.clone(),
                tensor: bogus,
            }],
        ];
        let mut p = Prefetch::<Vec<u8>>::start(jobs);
        assert_eq!(p.next_job().unwrap().len(), 1);
        let err = p.next_job().unwrap_err().to_string();
        assert!(err.contains("t1"), "{err}");
        assert!(p.next_job().is_err());
    }
}
