//! Stop requests from the outside (SIGINT, SIGTERM): the trainers finish the step in flight, write a
//! resume checkpoint and return [`crate::train::resume::Stopped`].
//!
//! The signal handler only sets a flag — nothing is written from signal context. A second signal while
//! the first is being honoured exits at once (status 130) for a user who does not want to wait; the last
//! resume checkpoint on disk is still whole, since checkpoints are written atomically.
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the SIGINT/SIGTERM handler (once per process; later calls do nothing).
pub fn install_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a new checkpoint (the last one on disk is intact)");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: stopping after the current step and writing a resume checkpoint \
                       (interrupt again to exit at once)");
        });
        if let Err(e) = r {
            eprintln!("warning: no interrupt handler ({e}); an interrupt stops the run without a final checkpoint");
        }
    });
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Requests a stop as a signal would (tests, embedding applications).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Clears a request (after a stopped run, before the next one in the same process).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}
