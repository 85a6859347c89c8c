# Source this once per shell so plain `cargo build` / `cargo test` find the project's libtorch:
#   . ./env.sh
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
