//! WebSocket codec (in progress).
