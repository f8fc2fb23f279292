// Tooltips for the HiDiffusion controls (hints.js reads `titles`). Kept in step with
// hidiffusion_lib/script_args.py ARGS by tests/test_webui_script.py.
(function () {
    if (typeof titles === "undefined") {
        return;
    }
    titles["HiDiffusion"] = "Generate above the model's training size without duplicated objects, and faster.";
    titles["RAU-Net"] = "Resolution-aware down/upsampling in the early steps: stops duplicated objects.";
    titles["MSW-MSA"] = "Shifted-window self-attention in the top blocks: faster at high resolution (SD 1.5, measured: a step 1.5x faster at 1024 px, 2.2x at 2048). At 2048 px the webui's Hypertile (not part of the paper) is faster still; with its U-Net option on, MSW-MSA steps aside.";
    titles["Model preset"] = "Block map and ratios; Auto reads the loaded model. SDXL-Turbo/Lightning cannot be detected.";
    titles["T1 ratio"] = "Fraction of the steps with the main RAU-Net switch on; auto takes the authors' preset. Type any value in [0, 1], e.g. 0.45.";
    titles["T2 ratio"] = "Fraction of the steps with the extra RAU-Net switch on (2048+ px); auto takes the preset. Type any value in [0, 1].";
    titles["Aggressive (SDXL)"] = "SDXL below 4096 px: the extra switch first, then the main one. Auto follows the authors.";
    titles["Window shift"] = "random: a pseudo-random shift per step, the same for every image; cycle: by step; fixed: the index below.";
    titles["Fixed shift index"] = "Shift in quarters of a window, used with the fixed policy.";
    titles["RAU interpolation"] = "How the resolution-aware upsampler interpolates while active (authors: nearest).";
    titles["Apply to hires fix pass"] = "Also run HiDiffusion in the hires fix second pass.";
    titles["Skip at native resolution"] = "Do nothing when the image's area is not larger than the model's training size (512x512 for SD 1.x/2.x, 768x768 for SD 2.x 768-v, 1024x1024 for SDXL, whose buckets such as 832x1216 count too).";
    titles["ControlNet recipe"] = "With a ControlNet unit on: run it at the model's training size and, unless you moved the unit's Ending Control Step, for the first 60% of the steps, as the authors do (faster, follows the control as well). Off: it runs at full size on the unit's own steps.";
})();
