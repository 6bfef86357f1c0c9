//! Which gateway worker thread the caller runs on. The server sets it when
//! a worker starts; the tunnel reads it to keep a stream on the worker of
//! its agent's session. A module of its own so that neither imports the
//! other.

use std::cell::Cell;

thread_local! {
    /// The index of the worker this thread runs, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as worker `i`.
pub(crate) fn set_current(i: usize) {
    WORKER.with(|c| c.set(Some(i)));
}

/// The index of the worker running the calling thread (`None` elsewhere).
pub(crate) fn current() -> Option<usize> {
    WORKER.with(|c| c.get())
}
