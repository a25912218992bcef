//! cairn-simulations (placeholder, see ARCHITECTURE.md).
