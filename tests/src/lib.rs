//! Real-process tests: real `cairn` nodes and real peers. See tests/tests/.
