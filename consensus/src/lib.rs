//! cairn-consensus (placeholder, see ARCHITECTURE.md).
