# Set up livediffusion on Windows: a virtual environment with the daemon and its tools.
#   powershell -ExecutionPolicy Bypass -File installers\install.ps1 [-Venv DIR] [-Cuda cu128] [-Extras daemon,obs,virtualcam,spout] [-TouchDesigner DIR]
# -TouchDesigner DIR also fills DIR for TouchDesigner's Python (pyzmq, msgpack, the component).
# -OBS also builds the OBS filter plugin into %ProgramData%\obs-studio\plugins (recent OBS); it needs
#   CMake, Visual Studio 2022, vcpkg's zeromq and an OBS build for libobs: -ObsCMakeArgs passes
#   e.g. "-DCMAKE_PREFIX_PATH=C:/obs-studio/build;C:/vcpkg/installed/x64-windows".
# PyPI's Windows torch wheels are CPU-only: -Cuda picks the matching build from PyTorch's index.
param(
    [string]$Venv = "$PSScriptRoot\..\.venv",
    [string]$Cuda = "cu128",
    [string]$Extras = "daemon,virtualcam,spout",
    [string]$TouchDesigner = "",
    [switch]$OBS,
    [string[]]$ObsCMakeArgs = @()
)
$ErrorActionPreference = "Stop"
$root = Resolve-Path "$PSScriptRoot\.."
py -3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)"
if ($LASTEXITCODE -ne 0) { Write-Error "livediffusion needs Python 3.10 or newer (py -3)." }
if ($OBS -and -not ($Extras -split "," -contains "obs")) { $Extras = "$Extras,obs" }
py -3 -m venv $Venv
& "$Venv\Scripts\python.exe" -m pip install --upgrade pip
if ($Cuda -eq "cpu") {
    & "$Venv\Scripts\python.exe" -m pip install "torch>=2.11"
} else {
    & "$Venv\Scripts\python.exe" -m pip install "torch>=2.11" --index-url "https://download.pytorch.org/whl/$Cuda"
}
& "$Venv\Scripts\python.exe" -m pip install -e "$root[$Extras]"
& "$Venv\Scripts\livediffusion.exe" doctor
if ($TouchDesigner -ne "") {
    & "$Venv\Scripts\livediffusion.exe" touchdesigner install $TouchDesigner --platform windows
}
if ($OBS) {
    $cmakeArgs = @()
    foreach ($a in $ObsCMakeArgs) { $cmakeArgs += "--cmake-arg=$a" }
    & "$Venv\Scripts\livediffusion.exe" obs install @cmakeArgs
}
Write-Host "livediffusion is installed in $Venv. Try: $Venv\Scripts\livediffusion.exe demo"
