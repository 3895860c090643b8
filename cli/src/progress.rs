//! A progress bar on a terminal, fed by the same events as every other sink.

use indicatif::{ProgressBar, ProgressStyle};
use pg_hardstorage_engine::event::FnSink;
use pg_hardstorage_engine::EventBus;

pub fn attach(bus: &EventBus) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} [{wide_bar}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bus.add_sink(FnSink::new("progress_bar", true, move |e| {
        let body = e.body.as_ref();
        match e.op.as_str() {
            "progress" => {
                if let Some(b) = body {
                    if let Some(t) = b["bytes_total"].as_u64() {
                        bar.set_length(t);
                    }
                    bar.set_position(b["bytes_logical"].as_u64().unwrap_or(0));
                    bar.set_message(format!(
                        "{:.0} MB/s, dedup {:.2}",
                        b["throughput_mb_s"].as_f64().unwrap_or(0.0),
                        b["dedup_ratio"].as_f64().unwrap_or(0.0)
                    ));
                }
            }
            "chunker_paused" => bar.set_message(format!(
                "waiting on {}",
                body.and_then(|b| b["stage"].as_str()).unwrap_or("?")
            )),
            op if op.ends_with("_completed") || op.ends_with("_failed") => bar.finish_and_clear(),
            _ => {}
        }
    }));
}
