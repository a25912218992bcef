//! cairn-blockstore (placeholder, see ARCHITECTURE.md).
