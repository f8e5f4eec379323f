//! Byte budgets for connections (invariant 6): how many bytes of request frames being
//! read or processed and of responses waiting to be written a connection, and a whole
//! shard, may hold.
//!
//! What it is: a counter with a maximum and a FIFO queue of waiters, on one shard's
//! thread (`Rc`, never `Send`). A connection takes a `Lease` on its own budget and its
//! shard's before it reads a frame's body; the lease grows to cover the response it
//! expects (a fetch) and shrinks to the response actually encoded, and is released when
//! the response has been written. When a budget is spent the reader waits, which stops
//! reading the socket: TCP backpressure. Waiters are served strictly in arrival order,
//! so a shard under pressure slows every connection alike instead of letting the
//! busiest take everything that is released.
//!
//! What it is not: an allocator. It counts what the connection code says it holds; the
//! counts are frame and response lengths, not allocator sizes.
//!
//! Contract: `acquire(n)` resolves once `n` bytes fit (or nothing at all is held, so one
//! request larger than the whole budget still runs, alone); `force(n)` adds without
//! waiting (an encoded response already exists: refusing to count it would only hide
//! it); `release(n)` gives back and wakes waiters in order. A waiter dropped before it
//! is served leaves the queue, and gives back what it was granted meanwhile.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

pub struct ByteBudget {
    bytes_max: u64,
    used: Cell<u64>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
}

struct Waiter {
    bytes: u64,
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl ByteBudget {
    pub fn new(bytes_max: u64) -> Rc<ByteBudget> {
        assert!(bytes_max > 0, "a byte budget allows at least one byte");
        Rc::new(ByteBudget {
            bytes_max,
            used: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
        })
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    fn fits(&self, bytes: u64) -> bool {
        let used = self.used.get();
        used == 0 || used.saturating_add(bytes) <= self.bytes_max
    }

    /// Waits until `bytes` fit, behind every earlier waiter, and takes them.
    pub fn acquire(self: &Rc<Self>, bytes: u64) -> Acquire {
        if self.waiters.borrow().is_empty() && self.fits(bytes) {
            self.used.set(self.used.get() + bytes);
            return Acquire {
                budget: Rc::clone(self),
                waiter: None,
            };
        }
        let waiter = Rc::new(Waiter {
            bytes,
            granted: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.waiters.borrow_mut().push_back(Rc::clone(&waiter));
        Acquire {
            budget: Rc::clone(self),
            waiter: Some(waiter),
        }
    }

    /// Counts `bytes` at once, past the maximum if need be.
    pub fn force(&self, bytes: u64) {
        self.used.set(self.used.get() + bytes);
    }

    pub fn release(&self, bytes: u64) {
        let used = self.used.get();
        assert!(bytes <= used, "releasing {bytes} bytes, {used} held");
        self.used.set(used - bytes);
        self.grant();
    }

    /// Serves waiters from the front while they fit.
    fn grant(&self) {
        loop {
            let front = match self.waiters.borrow().front() {
                Some(front) if self.fits(front.bytes) => Rc::clone(front),
                _ => return,
            };
            self.waiters.borrow_mut().pop_front();
            self.used.set(self.used.get() + front.bytes);
            front.granted.set(true);
            let waker = front.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// The future of `ByteBudget::acquire`.
pub struct Acquire {
    budget: Rc<ByteBudget>,
    /// None once the bytes are taken (at once, or when this future saw the grant).
    waiter: Option<Rc<Waiter>>,
}

impl Future for Acquire {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let Some(waiter) = &self.waiter else {
            return Poll::Ready(());
        };
        if waiter.granted.get() {
            self.waiter = None;
            return Poll::Ready(());
        }
        *waiter.waker.borrow_mut() = Some(context.waker().clone());
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        if waiter.granted.get() {
            // Granted after the last poll: nobody will use the bytes.
            self.budget.release(waiter.bytes);
        } else {
            self.budget
                .waiters
                .borrow_mut()
                .retain(|queued| !Rc::ptr_eq(queued, &waiter));
            // It may have been the one holding the queue up.
            self.budget.grant();
        }
    }
}

/// Bytes held on a connection's budget and its shard's, given back when dropped.
pub struct Lease {
    connection: Rc<ByteBudget>,
    shard: Rc<ByteBudget>,
    connection_bytes: u64,
    shard_bytes: u64,
}

impl Lease {
    pub fn empty(connection: &Rc<ByteBudget>, shard: &Rc<ByteBudget>) -> Lease {
        Lease {
            connection: Rc::clone(connection),
            shard: Rc::clone(shard),
            connection_bytes: 0,
            shard_bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.connection_bytes
    }

    /// Takes `bytes` more, waiting for the connection's budget, then the shard's. If the
    /// future is dropped half way, what it took stays in the lease and goes with it.
    pub async fn grow(&mut self, bytes: u64) {
        self.connection.acquire(bytes).await;
        self.connection_bytes += bytes;
        self.shard.acquire(bytes).await;
        self.shard_bytes += bytes;
    }

    /// Sets the lease to `bytes` without waiting: what is over gives back, what is
    /// missing is counted past the maximum (it exists already).
    pub fn resize(&mut self, bytes: u64) {
        for (budget, held) in [
            (&self.connection, &mut self.connection_bytes),
            (&self.shard, &mut self.shard_bytes),
        ] {
            if bytes < *held {
                budget.release(*held - bytes);
            } else {
                budget.force(bytes - *held);
            }
            *held = bytes;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.connection.release(self.connection_bytes);
        self.shard.release(self.shard_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once: whether the future has completed.
    fn ready<F: Future + Unpin>(future: &mut F) -> bool {
        futures_lite::future::block_on(futures_lite::future::poll_once(future)).is_some()
    }

    #[test]
    fn waiters_are_served_in_order_and_one_oversized_request_runs_alone() {
        let budget = ByteBudget::new(100);
        let mut first = budget.acquire(60);
        assert!(ready(&mut first));
        let mut second = budget.acquire(50);
        let mut third = budget.acquire(10);
        assert!(!ready(&mut second));
        // 10 would fit, but it queued behind 50: first come, first served.
        assert!(!ready(&mut third));
        budget.release(60);
        assert!(ready(&mut second) && ready(&mut third));
        assert_eq!(budget.used(), 60);
        budget.release(60);
        let mut huge = budget.acquire(1000);
        assert!(
            ready(&mut huge),
            "alone, a request larger than the budget runs"
        );
        let mut small = budget.acquire(1);
        assert!(!ready(&mut small));
        drop(small);
        budget.release(1000);
        assert_eq!(budget.used(), 0, "a dropped waiter holds nothing");
    }

    #[test]
    fn a_dropped_waiter_unblocks_the_queue_and_leases_give_everything_back() {
        let connection = ByteBudget::new(100);
        let shard = ByteBudget::new(150);
        let mut lease = Lease::empty(&connection, &shard);
        assert!(ready(&mut Box::pin(lease.grow(80))));
        let mut blocked = connection.acquire(50);
        let mut behind = connection.acquire(10);
        assert!(!ready(&mut blocked) && !ready(&mut behind));
        drop(blocked);
        assert!(ready(&mut behind), "the head of the queue left");
        connection.release(10);
        lease.resize(200);
        assert_eq!((connection.used(), shard.used()), (200, 200));
        lease.resize(5);
        assert_eq!((connection.used(), shard.used()), (5, 5));
        drop(lease);
        assert_eq!((connection.used(), shard.used()), (0, 0));
    }
}
