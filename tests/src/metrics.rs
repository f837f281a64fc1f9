//! Reading a service's Prometheus `/metrics` in tests.

/// The text of `{base}/metrics`.
pub async fn scrape(base: &str) -> String {
    let url = format!("{base}/metrics");
    let reply = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    reply
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading {url}: {e}"))
}

/// The sum of the samples whose line starts with `name` (a metric name, or
/// a name with the start of its labels, e.g. `x_total{result="ok"`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// [`metric`] `name` of the service at `base`, read now.
pub async fn read(base: &str, name: &str) -> f64 {
    metric(&scrape(base).await, name)
}
