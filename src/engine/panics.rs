//! Handler panics (guarantee 2.3): caught, and logged once by the engine with the subscriber, the
//! message's coordinates and where the panic happened. The process's panic hook is not run for them, so
//! a message that fails again and again prints no backtrace per attempt; panics anywhere else reach the
//! hook as before.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::sync::Once;

thread_local! {
    /// A handler is being called or polled on this thread.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
    /// Where the last handler panic on this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Puts the quiet hook in front of the process's panic hook, once.
pub(super) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_HANDLER.get() {
                LOCATION.set(info.location().map(|l| l.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs a handler's code, catching a panic as its message and location.
pub(super) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let was = IN_HANDLER.replace(true);
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_HANDLER.set(was);
    r.map_err(|panic| {
        let message = if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        match LOCATION.take() {
            Some(at) => format!("{message} (at {at})"),
            None => message,
        }
    })
}
