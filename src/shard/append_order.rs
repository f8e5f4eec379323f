//! The order in which produce requests append to one partition, on the partition's
//! owning shard (docs/protocol.md §5.5, "Order of pipelined produce requests").
//!
//! What it is: a ticket line per owned partition. A produce request takes a ticket for
//! each of its batches when it is *admitted* — synchronously, in the step that hands it to
//! the owner: on the shard that read it from the connection when that shard owns the
//! partition (`dispatch::start`, in the connection's reader, in frame order), or when the
//! owner takes it off the channel mesh (`Shard::serve_peer`, in the order the mesh
//! delivers, which is the order the reader sent it). Its append then waits until every
//! earlier ticket of the partition has appended or given up ([`AppendTicket::turn`]),
//! whatever awaits lie in between: the request's task starting, the cross-shard hop, an
//! earlier batch of the same request waiting for a chunk or a segment roll. Only the
//! append is ordered, not the durable wait after it, so pipelined requests still share
//! group-commit rounds.
//!
//! What it is not: an order across connections beyond "admitted first, appended first",
//! nor a lock held across durability waits. A ticket dropped without appending (a
//! request whose partition was refused, a task dropped at shutdown) gives its turn up,
//! so nothing behind it waits for an append that will never come.
//!
//! Runs on the owning shard only (`Rc`, `RefCell`); tickets never cross threads.
//! Invariant, asserted on every append in release builds too: a partition's tickets
//! append in the order they were taken (`appended` names the partition, the ticket and
//! the one that had the turn).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The ticket line of one owned partition.
pub struct AppendOrder {
    topic: Arc<str>,
    partition: u32,
    state: RefCell<OrderState>,
}

#[derive(Default)]
struct OrderState {
    /// The number the next ticket gets.
    issued: u64,
    /// The ticket whose append may run now: every earlier one has appended or given up.
    turn: u64,
    /// Tickets dropped before their turn: skipped when the turn reaches them.
    given_up: BTreeSet<u64>,
    /// Appends waiting for their turn, by ticket (one waiter per ticket).
    waiting: BTreeMap<u64, Waker>,
    /// The last ticket that appended.
    last_appended: Option<u64>,
}

impl AppendOrder {
    pub fn new(topic: Arc<str>, partition: u32) -> Rc<AppendOrder> {
        Rc::new(AppendOrder {
            topic,
            partition,
            state: RefCell::new(OrderState::default()),
        })
    }

    /// The next place in line. Taken synchronously where the request is admitted.
    pub fn take(self: &Rc<Self>) -> AppendTicket {
        let mut state = self.state.borrow_mut();
        let number = state.issued;
        state.issued += 1;
        AppendTicket {
            order: Rc::clone(self),
            number,
            finished: false,
        }
    }

    /// Tickets taken and not yet appended or given up (bounded by the requests in
    /// flight on the shard's connections and mesh).
    pub fn outstanding(&self) -> u64 {
        let state = self.state.borrow();
        state.issued - state.turn - state.given_up.len() as u64
    }

    /// Moves the turn past `number` and past every later ticket already given up, and
    /// wakes the append whose turn it now is. The caller holds `state`; the waker is
    /// returned to be woken after the borrow ends.
    fn advance(state: &mut OrderState, number: u64) -> Option<Waker> {
        assert_eq!(
            state.turn, number,
            "only the ticket with the turn passes it on"
        );
        state.turn += 1;
        while state.given_up.remove(&state.turn) {
            state.turn += 1;
        }
        state.waiting.remove(&state.turn)
    }
}

/// A place in a partition's append line. Append once [`AppendTicket::turn`] resolves,
/// then call [`AppendTicket::appended`]; dropping it instead gives the place up.
pub struct AppendTicket {
    order: Rc<AppendOrder>,
    number: u64,
    finished: bool,
}

impl std::fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendTicket")
            .field("topic", &self.order.topic)
            .field("partition", &self.order.partition)
            .field("number", &self.number)
            .finish()
    }
}

impl AppendTicket {
    /// Resolves once every earlier ticket of the partition has appended or given up.
    pub fn turn(&self) -> Turn<'_> {
        Turn { ticket: self }
    }

    /// The append this ticket stood for has ended (stored, a duplicate, or refused):
    /// the next ticket's append may run.
    ///
    /// # Panics
    /// When called out of turn: an append ran before an earlier ticket of its partition
    /// appended, which is the reordering this module exists to prevent.
    pub fn appended(mut self) {
        self.finished = true;
        let waker = {
            let mut state = self.order.state.borrow_mut();
            assert!(
                state.turn == self.number,
                "append order broken on {}/{}: ticket {} appended while ticket {} had the turn",
                self.order.topic,
                self.order.partition,
                self.number,
                state.turn
            );
            if let Some(last) = state.last_appended {
                assert!(
                    last < self.number,
                    "append order broken on {}/{}: ticket {} appended after ticket {last}",
                    self.order.topic,
                    self.order.partition,
                    self.number
                );
            }
            state.last_appended = Some(self.number);
            AppendOrder::advance(&mut state, self.number)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for AppendTicket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let waker = {
            let mut state = self.order.state.borrow_mut();
            state.waiting.remove(&self.number);
            if state.turn == self.number {
                AppendOrder::advance(&mut state, self.number)
            } else {
                assert!(
                    state.turn < self.number,
                    "ticket {} of {}/{} given up after its turn passed",
                    self.number,
                    self.order.topic,
                    self.order.partition
                );
                state.given_up.insert(self.number);
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The wait for a ticket's turn ([`AppendTicket::turn`]).
pub struct Turn<'a> {
    ticket: &'a AppendTicket,
}

impl Future for Turn<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let ticket = self.ticket;
        let mut state = ticket.order.state.borrow_mut();
        if state.turn == ticket.number {
            state.waiting.remove(&ticket.number);
            return Poll::Ready(());
        }
        state.waiting.insert(ticket.number, context.waker().clone());
        Poll::Pending
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // A wait abandoned before its turn leaves no waker behind.
        if let Ok(mut state) = self.ticket.order.state.try_borrow_mut() {
            state.waiting.remove(&self.ticket.number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    fn order() -> Rc<AppendOrder> {
        AppendOrder::new(Arc::from("t"), 3)
    }

    #[test]
    fn a_ticket_waits_for_every_earlier_ticket_to_append() {
        let order = order();
        let first = order.take();
        let second = order.take();
        let third = order.take();
        block_on(async {
            assert!(poll_once(third.turn()).await.is_none(), "two tickets ahead");
            assert!(poll_once(second.turn()).await.is_none(), "one ticket ahead");
            assert!(poll_once(first.turn()).await.is_some());
            first.appended();
            assert!(poll_once(third.turn()).await.is_none(), "one ticket ahead");
            second.turn().await;
            second.appended();
            third.turn().await;
            third.appended();
        });
        assert_eq!(order.outstanding(), 0);
    }

    #[test]
    fn a_ticket_given_up_passes_its_turn_whenever_it_is_dropped() {
        let order = order();
        let first = order.take();
        let second = order.take();
        let third = order.take();
        let fourth = order.take();
        // Given up before its turn: skipped when the turn reaches it.
        drop(second);
        block_on(async {
            first.turn().await;
            first.appended();
            assert!(
                poll_once(third.turn()).await.is_some(),
                "the second gave up"
            );
            // Given up at its turn: the next one goes at once.
            drop(third);
            assert!(poll_once(fourth.turn()).await.is_some());
            fourth.appended();
        });
        assert_eq!(order.outstanding(), 0);
    }

    #[test]
    #[should_panic(
        expected = "append order broken on t/3: ticket 1 appended while ticket 0 had the turn"
    )]
    fn an_append_out_of_turn_is_a_bug() {
        let order = order();
        let _first = order.take();
        let second = order.take();
        second.appended();
    }
}
