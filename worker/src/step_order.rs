//! The order a rank runs steps in: `step_id` order, whatever order they arrive in. With
//! asynchronous scheduling the coordinator sends step N+1 while step N runs, so N+1 can reach
//! the rank first (each step is its own HTTP/2 stream); it waits here until N has run. A load
//! starts the count again and refuses the steps still waiting, whose group is gone.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

/// Where the rank is in its group's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    /// Loads begun so far: a step waits only for steps of the shard it arrived under.
    shard: u64,
    /// The step the runner runs next.
    next_step: u64,
}

/// The rank's turn, shared by its step handlers.
#[derive(Debug)]
pub struct StepOrder {
    turn: watch::Sender<Turn>,
    waiting: AtomicUsize,
}

impl Default for StepOrder {
    fn default() -> Self {
        StepOrder {
            turn: watch::Sender::new(Turn {
                shard: 0,
                next_step: 0,
            }),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// Counts a step among the waiting while it lives (a handler dropped mid-wait is counted out).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StepOrder {
    /// Returns once step `step_id` may run: every step before it has run (a step whose turn has
    /// passed returns at once, for the runner to refuse as out of order). Fails if a load began
    /// while it waited.
    pub async fn wait_for_turn(&self, step_id: u64) -> Result<(), String> {
        let mut turn = self.turn.subscribe();
        let arrived = *turn.borrow();
        if arrived.next_step >= step_id {
            return Ok(());
        }
        let _waiting = Waiting::enter(&self.waiting);
        let now = match turn
            .wait_for(|t| t.shard != arrived.shard || t.next_step >= step_id)
            .await
        {
            Ok(now) => *now,
            // Unreachable while `self` lives, which holds the sender.
            Err(_) => return Err("the rank is shutting down".into()),
        };
        if now.shard != arrived.shard {
            return Err(format!(
                "step {step_id} arrived before step {} and waited for it, but the shard was \
                 loaded again meanwhile",
                arrived.next_step
            ));
        }
        Ok(())
    }

    /// A step ran (or was refused): the runner expects `next_step` now.
    pub fn advance(&self, next_step: u64) {
        self.turn.send_modify(|t| t.next_step = next_step);
    }

    /// A load begins: the steps waiting are refused, and the new shard's steps count from 0.
    pub fn restart(&self) {
        self.turn.send_modify(|t| {
            t.shard += 1;
            t.next_step = 0;
        });
    }

    /// Steps that arrived ahead of their turn and wait for it.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Spawns a wait for `step`'s turn and returns once it is waiting.
    async fn spawn_wait(
        order: &Arc<StepOrder>,
        step: u64,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let before = order.waiting();
        let o = order.clone();
        let handle = tokio::spawn(async move { o.wait_for_turn(step).await });
        while order.waiting() == before && !handle.is_finished() {
            tokio::task::yield_now().await;
        }
        handle
    }

    #[tokio::test]
    async fn a_step_waits_for_the_steps_before_it() {
        let order = Arc::new(StepOrder::default());
        order.wait_for_turn(0).await.unwrap();
        let third = spawn_wait(&order, 2).await;
        let second = spawn_wait(&order, 1).await;
        assert_eq!(order.waiting(), 2);
        order.advance(1);
        second.await.unwrap().unwrap();
        assert!(!third.is_finished());
        assert_eq!(order.waiting(), 1);
        order.advance(2);
        third.await.unwrap().unwrap();
        assert_eq!(order.waiting(), 0);
        // A step whose turn has passed is let through for the runner to refuse.
        order.wait_for_turn(1).await.unwrap();
    }

    #[tokio::test]
    async fn a_load_refuses_the_steps_waiting_and_counts_again() {
        let order = Arc::new(StepOrder::default());
        let waiting = spawn_wait(&order, 3).await;
        order.restart();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(err.contains("loaded again"), "{err}");
        order.wait_for_turn(0).await.unwrap();
        let next = spawn_wait(&order, 1).await;
        order.advance(1);
        next.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_handler_dropped_mid_wait_is_no_longer_counted() {
        let order = Arc::new(StepOrder::default());
        let waiting = spawn_wait(&order, 5).await;
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(order.waiting(), 0);
    }
}
