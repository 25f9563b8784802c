//! How outcomes reach the store when it refuses some of them, or is down.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::record;
use crate::store::*;

/// A store that only records outcomes: it refuses any group holding the
/// delivery `poison`, and every write while `down` holds.
#[derive(Default)]
struct Outcomes {
    poison: Option<i64>,
    down: Mutex<u32>,
    recorded: Mutex<Vec<i64>>,
    tries: Mutex<u32>,
}

impl Outcomes {
    fn recorded(&self) -> Vec<i64> {
        let mut r = self.recorded.lock().unwrap().clone();
        r.sort();
        r
    }

    /// One more write tried; whether the store is down for it.
    fn down_now(&self) -> bool {
        *self.tries.lock().unwrap() += 1;
        let mut down = self.down.lock().unwrap();
        if *down > 0 {
            *down -= 1;
            return true;
        }
        false
    }
}

#[async_trait]
impl Store for Outcomes {
    async fn complete(&self, done: Vec<Completion>) -> Result<(), StoreError> {
        if self.down_now() {
            return Err(StoreError::Unavailable("disk I/O error".into()));
        }
        if done.iter().any(|c| Some(c.delivery_id) == self.poison) {
            return Err(StoreError::Unavailable("refused".into()));
        }
        self.recorded.lock().unwrap().extend(done.iter().map(|c| c.delivery_id));
        Ok(())
    }
    async fn writable(&self) -> Result<(), StoreError> {
        if self.down_now() {
            return Err(StoreError::Unavailable("disk I/O error".into()));
        }
        Ok(())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.writable().await
    }
    // Nothing below is reached by recording outcomes.
    async fn insert(&self, _: NewEvent) -> Result<Inserted, StoreError> {
        unreachable!()
    }
    async fn claim(&self, _: &str, _: usize, _: Duration, _: i64) -> Result<Vec<Claimed>, StoreError> {
        unreachable!()
    }
    async fn next_due(&self, _: &str) -> Result<Option<i64>, StoreError> {
        unreachable!()
    }
    async fn events(&self, _: EventFilter) -> Result<Vec<EventSummary>, StoreError> {
        unreachable!()
    }
    async fn deliveries(&self, _: DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        unreachable!()
    }
    async fn event_detail(&self, _: &str, _: &str) -> Result<EventDetail, StoreError> {
        unreachable!()
    }
    async fn queue_stats(&self) -> Result<Vec<SinkQueue>, StoreError> {
        unreachable!()
    }
    async fn replay(&self, _: ReplayTarget, _: i64) -> Result<u64, StoreError> {
        unreachable!()
    }
    async fn prune(&self, _: Retention, _: i64) -> Result<PruneStats, StoreError> {
        unreachable!()
    }
    async fn close(&self) {}
}

fn delivered(ids: &[i64]) -> Vec<Completion> {
    ids.iter()
        .map(|&delivery_id| Completion {
            delivery_id,
            attempt: 1,
            lease_until: 1_000,
            finished_at: 500,
            result: Completed::Delivered,
        })
        .collect()
}

/// One outcome the store refuses does not hold back the others with it.
#[tokio::test(start_paused = true)]
async fn an_outcome_the_store_refuses_is_left_to_its_lease() {
    let store = Outcomes {
        poison: Some(2),
        ..Outcomes::default()
    };
    let recording = record(&store, delivered(&[1, 2, 3]), || false);
    tokio::time::timeout(Duration::from_secs(3600), recording)
        .await
        .expect("the group is still being tried after an hour");
    assert_eq!(store.recorded(), [1, 3]);
}

/// While the store takes no writes at all, nothing is given up: the group
/// goes in whole once it is back.
#[tokio::test(start_paused = true)]
async fn outcomes_wait_out_a_store_that_is_down() {
    let store = Outcomes {
        down: Mutex::new(20),
        ..Outcomes::default()
    };
    record(&store, delivered(&[1, 2, 3]), || false).await;
    assert_eq!(store.recorded(), [1, 2, 3]);
    assert!(*store.tries.lock().unwrap() > 20, "it kept trying");
}

/// A group that goes in at the first try is one write.
#[tokio::test(start_paused = true)]
async fn a_group_is_one_write() {
    let store = Outcomes::default();
    record(&store, delivered(&[1, 2, 3]), || false).await;
    assert_eq!(store.recorded(), [1, 2, 3]);
    assert_eq!(*store.tries.lock().unwrap(), 1);
}
