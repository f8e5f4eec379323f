//! Single-thread coordination helpers for a shard: a notify-all event and the chunk
//! memory budget. Neither is `Send`; both live and die on the shard that made them.

use std::cell::RefCell;
use std::rc::Rc;

use futures_channel::oneshot;
use glommio::sync::{Semaphore, StaticPermit};

/// Wakes every current listener. A listener that subscribes after `notify_all` waits for
/// the next one, so callers check their condition after subscribing, then await.
#[derive(Default)]
pub struct Notify {
    listeners: RefCell<Vec<oneshot::Sender<()>>>,
    /// Listener count after the last sweep of abandoned listeners.
    swept_length: std::cell::Cell<usize>,
}

impl Notify {
    pub fn new() -> Notify {
        Notify::default()
    }

    /// A future that resolves at the next `notify_all` (or when the Notify is dropped).
    pub fn listen(&self) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        let mut listeners = self.listeners.borrow_mut();
        // Drop listeners whose futures were abandoned (timed-out long polls) whenever the
        // list has doubled since the last sweep: it stays within twice the live waiters,
        // at amortised constant cost per listen.
        if listeners.len() >= 2 * self.swept_length.get().max(16) {
            listeners.retain(|listener| !listener.is_canceled());
            self.swept_length.set(listeners.len());
        }
        listeners.push(sender);
        receiver
    }

    pub fn notify_all(&self) {
        for listener in self.listeners.borrow_mut().drain(..) {
            let _ = listener.send(());
        }
        self.swept_length.set(0);
    }
}

/// The per-shard budget for append chunks (invariant 6): every chunk holds a permit for its
/// size until it has been written, and appends wait when the budget is spent, which turns a
/// slow disk into backpressure on producers instead of memory growth.
pub struct ChunkBudget {
    semaphore: Rc<Semaphore>,
    chunk_size_bytes: usize,
}

impl ChunkBudget {
    pub fn new(budget_bytes: usize, chunk_size_bytes: usize) -> Rc<ChunkBudget> {
        let chunks = (budget_bytes / chunk_size_bytes) as u64;
        assert!(
            chunks >= 2,
            "the chunk budget must hold at least two chunks"
        );
        Rc::new(ChunkBudget {
            semaphore: Rc::new(Semaphore::new(chunks)),
            chunk_size_bytes,
        })
    }

    pub fn chunk_size_bytes(&self) -> usize {
        self.chunk_size_bytes
    }

    /// Waits for room for one chunk.
    pub async fn acquire(&self) -> StaticPermit {
        self.semaphore
            .acquire_static_permit(1)
            .await
            .expect("the chunk budget semaphore is never closed")
    }

    pub fn chunks_available(&self) -> u64 {
        self.semaphore.available()
    }
}
