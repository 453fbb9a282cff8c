//! Pure work over many independent items split over the cores, for the
//! batches of a first or full sync (thousands of Services). Results keep
//! the items' order, so a parallel run equals a serial one.

/// `f` of each item, in order: on every core when there are at least `min`
/// items, else on this thread (below that a thread costs more than it saves).
pub fn map<T: Sync, R: Send>(items: &[T], min: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let serial = |part: &[T]| part.iter().map(&f).collect::<Vec<R>>();
    // The size first: asking for the cores reads the cgroup's CPU quota,
    // not worth it on every incremental sync.
    if items.len() < min.max(2) {
        return serial(items);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 {
        return serial(items);
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = items.chunks(chunk);
        let first = parts.next().unwrap_or_default();
        let serial = &serial;
        let handles: Vec<_> = parts
            .map(|part| scope.spawn(move || serial(part)))
            .collect();
        let mut out = serial(first);
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::map;

    #[test]
    fn a_split_run_keeps_the_order_of_a_serial_one() {
        let items: Vec<u32> = (0..10_001).collect();
        let square = |i: &u32| u64::from(*i) * u64::from(*i);
        let serial: Vec<u64> = items.iter().map(square).collect();
        assert_eq!(map(&items, 1, square), serial);
        assert_eq!(map(&items, usize::MAX, square), serial);
        assert_eq!(map(&items[..1], 1, square), serial[..1]);
        assert!(map(&items[..0], 1, square).is_empty());
    }
}
