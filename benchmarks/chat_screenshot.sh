#!/usr/bin/env bash
# The README's chat screenshot: `edgeq chat` in a real terminal (tmux, 100x30), one question, the streamed
# answer captured as text and as an SVG (ANSI colours rendered by rich, which Textual already installs).
#   benchmarks/chat_screenshot.sh ["question"] [seconds to wait]
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${1:-"Write a Python function that checks whether a number is prime."}
WAIT=${2:-40}
OUT=docs/results
tmux kill-session -t edgeq-shot 2>/dev/null || true
tmux new-session -d -s edgeq-shot -x 100 -y 30 "edgeq chat; sleep 600"
sleep 12                                   # start-up: load the model, draw the screen
tmux send-keys -t edgeq-shot "$Q" Enter
sleep "$WAIT"
tmux capture-pane -p -t edgeq-shot > "$OUT/chat_screen.txt"
tmux capture-pane -p -e -t edgeq-shot > "$OUT/chat_screen.ansi"
tmux kill-session -t edgeq-shot
python - "$OUT" <<'EOF'
import sys
from rich.console import Console
from rich.text import Text

out = sys.argv[1]
con = Console(record=True, width=100, force_terminal=True, color_system="truecolor", file=open("/dev/null", "w"))
con.print(Text.from_ansi(open(f"{out}/chat_screen.ansi").read()), end="")
con.save_svg(f"{out}/chat_screenshot_tmux.svg", title="edgeq chat (tmux 100x30)")
print(f"wrote {out}/chat_screen.txt and {out}/chat_screenshot_tmux.svg")
EOF
rm -f "$OUT/chat_screen.ansi"
