//! `rsyncfs-node up`: its options from flags and from a TOML config file (`--config`), a flag
//! overriding the file's value, and where its log goes (standard error, for the journal under
//! systemd, or `--log-file`).

use super::{parse_every, parse_listen, CongestionArg, Every, ModeArg, DEFAULT_STATE};
use crate::{daemon, net};
use clap::ValueEnum;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The options of `up`. Each is also a key of the config file, spelled as the flag.
#[derive(clap::Args, Debug, Default)]
pub(super) struct UpArgs {
    /// A TOML file holding any of the options below, each keyed by its flag's name without the
    /// dashes (`backing = "/srv/data"`, `scan-every = "30m"`, `no-introductions = true`);
    /// relative paths in it are taken from the file's folder. A flag given as well wins.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The node's state folder: its identity, store, peers and control socket (one per node;
    /// default /var/lib/rsyncfs).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The directory that holds this host's copy of the tree (needed, as a flag or in the
    /// config file).
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// An empty directory to mount the tree on; programs use this one (needed, as a flag or in
    /// the config file).
    #[arg(long)]
    pub mount: Option<PathBuf>,
    /// Address and UDP port to listen on: IP, IP:PORT, [IPv6]:PORT, PORT or HOST[:PORT]
    /// (default 0.0.0.0:7431: every address of this host, port 7431).
    #[arg(long, value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Which way changes go between this node and its peers (default two-way).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Trust only the peers this node joined or accepted, not the members they introduce
    /// (for meshes that are not fully connected, such as a line).
    #[arg(long)]
    pub no_introductions: bool,
    /// How often to look at the whole backing directory for changes made there directly,
    /// not through the mount (cheap when nothing changed: a stat per path); `off` for
    /// never (at start and on `rsyncfs-node rescan` only). Default 1h.
    #[arg(long, value_parser = parse_every)]
    pub scan_every: Option<Every>,
    /// The congestion controller of peer connections (default bbr): bbr paces by the measured
    /// bandwidth and round trip, and random loss does not slow it (through 50 ms each way and
    /// 1% loss it moved 100 MiB in 4.2 s, cubic 20 MiB in 127 s: bench/wan.py); cubic and
    /// new-reno back off at every loss, which yields more to TCP flows on a congested link.
    #[arg(long, value_enum)]
    pub congestion: Option<CongestionArg>,
    /// Serve Prometheus metrics at http://ADDR/metrics and a read-only status page at
    /// http://ADDR/ (TCP; ADDR as for --listen, e.g. 127.0.0.1:9431). Off by default.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub metrics: Option<SocketAddr>,
    /// Keep the content of local files that peers' updates replace or remove, for this long
    /// (30d, 12h, ...; `off`, the default, keeps none). Kept in the node's state folder in the
    /// backing directory, never replicated: `rsyncfs-node versions PATH`, `restore PATH`.
    #[arg(long, value_name = "DURATION", value_parser = parse_every)]
    pub keep_versions: Option<Every>,
    /// With --keep-versions: at most this many versions of one path (default 10; 1 to 1000).
    #[arg(long, value_name = "N")]
    pub versions_max: Option<usize>,
    /// Append the log to this file instead of writing it to standard error (which systemd
    /// sends to the journal). RUST_LOG chooses what is logged (default: warnings).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// The config file: the flags of `up`, each optional, nothing else.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct UpConfig {
    state: Option<PathBuf>,
    backing: Option<PathBuf>,
    mount: Option<PathBuf>,
    listen: Option<String>,
    mode: Option<String>,
    no_introductions: Option<bool>,
    scan_every: Option<String>,
    congestion: Option<String>,
    metrics: Option<String>,
    keep_versions: Option<String>,
    versions_max: Option<usize>,
    log_file: Option<PathBuf>,
}

/// The file a config may be at most (a config is a few lines).
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// Why `up` cannot start with the options it was given.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpError {
    #[error("the config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {} is larger than {CONFIG_BYTES_MAX} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("the config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// A value in the config file that its flag would refuse.
    #[error("{key} in {}: {why}", path.display())]
    Value {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--{0} is needed (or `{0} = \"...\"` in a --config file)")]
    Needed(&'static str),
    #[error("the log file {}: {source}", path.display())]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `up` runs with: the daemon's options and where the log goes.
#[derive(Debug)]
pub(super) struct Up {
    pub options: daemon::Options,
    pub log_file: Option<PathBuf>,
}

impl UpArgs {
    /// The options: each flag given, else the config file's value, else the default.
    pub fn resolve(self) -> Result<Up, UpError> {
        let (file, folder) = match &self.config {
            None => (UpConfig::default(), PathBuf::new()),
            Some(path) => {
                let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (read_config(path)?, folder)
            }
        };
        // A value from the file that does not parse (only the file's values are parsed here).
        let config = self.config.clone().unwrap_or_default();
        let bad = |key: &'static str| {
            let path = config.clone();
            move |why: String| UpError::Value { key, path, why }
        };
        let in_folder = |p: PathBuf| if p.is_relative() { folder.join(p) } else { p };
        let needed = |flag: Option<PathBuf>, key: Option<PathBuf>, name: &'static str| {
            flag.or(key.map(in_folder)).ok_or(UpError::Needed(name))
        };
        let backing = needed(self.backing, file.backing, "backing")?;
        let mount = needed(self.mount, file.mount, "mount")?;
        let state = self
            .state
            .or(file.state.map(in_folder))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
        let listen = match (self.listen, file.listen) {
            (Some(flag), _) => flag,
            (None, Some(text)) => parse_listen(&text).map_err(bad("listen"))?,
            (None, None) => SocketAddr::from(([0, 0, 0, 0], net::DEFAULT_PORT)),
        };
        let mode = match (self.mode, file.mode) {
            (Some(flag), _) => flag,
            (None, Some(text)) => enum_value(&text).map_err(bad("mode"))?,
            (None, None) => ModeArg::TwoWay,
        };
        let scan_every = match (self.scan_every, file.scan_every) {
            (Some(flag), _) => flag,
            (None, Some(text)) => parse_every(&text).map_err(bad("scan-every"))?,
            (None, None) => Every(Some(std::time::Duration::from_secs(3600))),
        };
        let congestion = match (self.congestion, file.congestion) {
            (Some(flag), _) => flag,
            (None, Some(text)) => enum_value(&text).map_err(bad("congestion"))?,
            (None, None) => CongestionArg::Bbr,
        };
        let metrics = match (self.metrics, file.metrics) {
            (Some(flag), _) => Some(flag),
            (None, Some(text)) => Some(parse_listen(&text).map_err(bad("metrics"))?),
            (None, None) => None,
        };
        let keep_versions = match (self.keep_versions, file.keep_versions) {
            (Some(flag), _) => flag,
            (None, Some(text)) => parse_every(&text).map_err(bad("keep-versions"))?,
            (None, None) => Every(None),
        };
        let versions_max = self.versions_max.or(file.versions_max).unwrap_or(10);
        if !(1..=crate::tree::versions::VERSIONS_PER_PATH_MAX).contains(&versions_max) {
            return Err(UpError::Value {
                key: "versions-max",
                path: config.clone(),
                why: format!(
                    "{versions_max} is not between 1 and {}",
                    crate::tree::versions::VERSIONS_PER_PATH_MAX
                ),
            });
        }
        let versions = keep_versions
            .0
            .map(|keep_for| crate::tree::versions::Policy {
                keep_for,
                max: versions_max,
            });
        let no_introductions = self.no_introductions || file.no_introductions.unwrap_or(false);
        Ok(Up {
            options: daemon::Options {
                state,
                backing,
                mount,
                listen,
                mode: mode.engine(),
                introductions: !no_introductions,
                scan_every: scan_every.0,
                congestion: congestion.net(),
                metrics,
                versions,
            },
            log_file: self.log_file.or(file.log_file.map(in_folder)),
        })
    }
}

fn read_config(path: &Path) -> Result<UpConfig, UpError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(CONFIG_BYTES_MAX + 1).read_to_string(&mut text))
        .map_err(|source| UpError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > CONFIG_BYTES_MAX {
        return Err(UpError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    toml::from_str(&text).map_err(|source| UpError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// A value of one of the flags' enumerations, spelled as on the command line.
fn enum_value<T: ValueEnum>(text: &str) -> Result<T, String> {
    T::from_str(text, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        format!("`{text}` is not one of {}", names.join(", "))
    })
}

/// Sends the log to standard error (plain text where that is not a terminal, as under
/// systemd's journal) or appends it to `file`, filtered by RUST_LOG (default: warnings).
pub(super) fn init_log(file: Option<&Path>) -> Result<(), UpError> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file {
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| UpError::LogFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            builder
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .init();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(flags: &[&str]) -> UpArgs {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            up: UpArgs,
        }
        let mut argv = vec!["up"];
        argv.extend_from_slice(flags);
        <Only as clap::Parser>::try_parse_from(argv).unwrap().up
    }

    fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rsyncfs.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// The example config in the repository, which the systemd unit points at.
    const EXAMPLE: &str = include_str!("../../dist/rsyncfs.toml");

    #[test]
    fn the_example_config_names_every_flag_of_up_and_nothing_else() {
        let up = super::super::Cli::command();
        let up = up.find_subcommand("up").unwrap();
        let keys: Vec<String> = up
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "config"))
            .map(str::to_string)
            .collect();
        assert_eq!(keys.len(), 12, "{keys:?}");
        // Every key, uncommented, is accepted with its example value.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| l.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: toml::Table = toml::from_str(&uncommented).unwrap();
        for key in &keys {
            assert!(parsed.contains_key(key), "the example lacks `{key}`");
        }
        assert_eq!(parsed.len(), keys.len(), "{parsed:?}");
        let (_dir, path) = config(&uncommented);
        let up = args(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert!(up.log_file.is_some());
    }

    #[test]
    fn a_flag_overrides_the_file_which_overrides_the_default() {
        let (dir, path) = config(
            "backing = \"data\"\nmount = \"/mnt/tree\"\nlisten = \"48016\"\nmode = \"receive-only\"\n\
             scan-every = \"off\"\ncongestion = \"cubic\"\nno-introductions = true\n",
        );
        let file = path.to_str().unwrap();
        let up = args(&["--config", file]).resolve().unwrap();
        let o = &up.options;
        assert_eq!(o.backing, dir.path().join("data"), "relative to the file");
        assert_eq!(o.mount, PathBuf::from("/mnt/tree"));
        assert_eq!(o.state, PathBuf::from(DEFAULT_STATE));
        assert_eq!(o.listen.to_string(), "0.0.0.0:48016");
        assert_eq!(o.mode, rsyncfs_mesh::engine::Mode::ReceiveOnly);
        assert_eq!(o.scan_every, None);
        assert!(!o.introductions);
        assert_eq!(o.congestion, net::tls::Congestion::Cubic);
        assert_eq!(up.log_file, None);
        let up = args(&[
            "--config",
            file,
            "--backing",
            "/b",
            "--listen",
            "127.0.0.1",
            "--mode",
            "two-way",
            "--scan-every",
            "5m",
        ])
        .resolve()
        .unwrap();
        let o = &up.options;
        assert_eq!(o.backing, PathBuf::from("/b"));
        assert_eq!(o.listen.to_string(), "127.0.0.1:7431");
        assert_eq!(o.mode, rsyncfs_mesh::engine::Mode::TwoWay);
        assert_eq!(o.scan_every, Some(std::time::Duration::from_secs(300)));
        // Without a file: the defaults.
        let o = args(&["--backing", "/b", "--mount", "/m"])
            .resolve()
            .unwrap()
            .options;
        assert_eq!(o.listen.to_string(), "0.0.0.0:7431");
        assert_eq!(o.scan_every, Some(std::time::Duration::from_secs(3600)));
        assert!(o.introductions);
    }

    #[test]
    fn a_bad_config_says_what_and_where() {
        let cases = [
            (
                "backing = \"/b\"\nmount = \"/m\"\nbakcing = 1\n",
                "unknown field `bakcing`",
            ),
            (
                "backing = \"/b\"\nmount = \"/m\"\nmode = \"both\"\n",
                "mode in",
            ),
            (
                "backing = \"/b\"\nmount = \"/m\"\nlisten = \"nowhere at all\"\n",
                "listen in",
            ),
            (
                "backing = \"/b\"\nmount = \"/m\"\nscan-every = \"often\"\n",
                "scan-every in",
            ),
            ("backing = [\n", "rsyncfs.toml"),
            ("mount = \"/m\"\n", "--backing is needed"),
        ];
        for (text, want) in cases {
            let (_dir, path) = config(text);
            let e = args(&["--config", path.to_str().unwrap()])
                .resolve()
                .unwrap_err();
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        let e = args(&["--config", "/no/such/rsyncfs.toml"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("/no/such/rsyncfs.toml"), "{e}");
    }
}
