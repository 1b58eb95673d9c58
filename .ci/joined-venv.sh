# Sourced by install-sglang.sh and install-vllm.sh: make (or keep) the venv $VENV and join it to the
# main environment of $PYTHON. addsitedir (not a bare path) so the main environment's own .pth files
# (the editable sllmfs, its entry points) apply too; written before any install, so pip sees what the
# main environment has and does not install it again, while the venv's own packages come first.
MAIN_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$MAIN_SITE')" >"$VENV_SITE/zz-sllmfs-main-env.pth"
