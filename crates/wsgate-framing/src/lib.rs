//! Framing functions (in progress).
