//! What the consensus benchmarks share.

/// The machine's load averages (1, 5, 15 minutes), printed with the figures: these machines are
/// shared, and a figure means little without them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}
