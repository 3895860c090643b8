//! How results and errors reach the terminal: the contract's envelopes
//! under `-o json`, events line by line under `-o ndjson`, text under
//! `-o table`.

use pg_hardstorage_engine::event::NdjsonSink;
use pg_hardstorage_engine::{EventBus, Problem};
use serde_json::Value;
use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Ndjson,
}

pub struct Out {
    pub format: Format,
    pub quiet: bool,
    pub bus: EventBus,
    /// Events were streamed (so the final body/error already went out).
    pub streamed: bool,
}

impl Out {
    pub fn new(format: Option<Format>, quiet: bool) -> Self {
        let format = format.unwrap_or(if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        });
        Out {
            format,
            quiet,
            bus: EventBus::new(),
            streamed: false,
        }
    }

    /// Attaches the sinks a streaming command uses.
    pub fn stream_events(&mut self) {
        match self.format {
            Format::Ndjson => {
                self.bus.add_sink(NdjsonSink::new(std::io::stdout()));
                self.streamed = true;
            }
            Format::Table if !self.quiet && std::io::stderr().is_terminal() => {
                crate::progress::attach(&self.bus);
            }
            _ => {}
        }
    }

    pub fn success(&self, command: &str, body: Value, table: impl FnOnce(&Value) -> String) {
        self.bus.close();
        match self.format {
            Format::Json => println!("{}", envelope(command, body)),
            Format::Ndjson => {
                if !self.streamed {
                    println!(
                        "{}",
                        serde_json::to_string(&envelope(command, body)).unwrap_or_default()
                    );
                }
            }
            Format::Table => {
                if !self.quiet {
                    print!("{}", table(&body));
                }
            }
        }
    }

    pub fn failure(&self, p: &Problem) {
        self.bus.close();
        match self.format {
            Format::Json => println!("{}", error_envelope(p)),
            Format::Ndjson => {
                // A streamed command already ended with its error frame.
                if !self.streamed {
                    print!(
                        "{}",
                        serde_json::to_string(&error_envelope(p)).unwrap_or_default()
                    );
                }
            }
            Format::Table => {
                eprintln!("error[{}]: {}", p.code, p.message);
                if let Some(s) = &p.suggestion {
                    eprintln!("  hint: {}", s.human);
                    if let Some(c) = &s.command {
                        eprintln!("  try:  {c}");
                    }
                }
            }
        }
    }
}

pub use pg_hardstorage_engine::event::{envelope, error_envelope};

/// Human sizes for tables.
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
