//! cairn-bootproto (placeholder, see ARCHITECTURE.md).
