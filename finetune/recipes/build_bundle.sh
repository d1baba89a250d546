#!/usr/bin/env bash
# How the default bundle (bundle/) is made, stage by stage, on the 2-core CPU machine (each run an hour or less).
# Every stage resumes from its run folder's checkpoint when run again; run one at a time (2 cores).
# Usage: bash finetune/recipes/build_bundle.sh [STAGE ...]   (default: all, in order)
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLVLM=${TOOLVLM:-.venv/bin/toolvlm}
R=finetune/recipes

stage_encoder()   {
  $TOOLVLM train encoder   $R/world_encoder.yaml
  # then 2000 more steps with the presence loss (the controller's and detector's towers come from runs/encoder)
  $TOOLVLM train encoder   $R/world_encoder_presence.yaml continue_from=runs/encoder/export
}
stage_detector()  {
  $TOOLVLM train detector  $R/world_detector.yaml
  $TOOLVLM train detector  $R/world_detector.yaml --export-only  # + vision/ for the controller
  # the bundle's detector: 3000 more steps at 320 px (the controller keeps the 224 px tower of runs/detector)
  $TOOLVLM train detector  $R/world_detector_more.yaml
  # then 1400 more with a quarter of each batch from scenes holding a bird (the weakest category)
  $TOOLVLM train detector  $R/world_detector_focus.yaml continue_from=runs/detector_more/export
  # then 1500 more where each image is also asked for present categories in colours they lack (hard negatives)
  $TOOLVLM train detector  $R/world_detector_hard_negatives.yaml \
    continue_from=runs/detector_focus/export
  # then rounds of 1500 where each image is asked every absent phrase, the fourth on fresh scenes
  $TOOLVLM train detector  $R/world_detector_all_negatives.yaml \
    continue_from=runs/detector_hard_negatives/export
  for k in 2 3; do
    $TOOLVLM train detector  $R/world_detector_all_negatives.yaml \
      run_dir=runs/detector_all_negatives$k continue_from=runs/detector_all_negatives$((k - 1))/export
  done
  $TOOLVLM train detector  $R/world_detector_all_negatives.yaml \
    run_dir=runs/detector_all_negatives4 continue_from=runs/detector_all_negatives3/export scene_offset=1000000 seed=1
  # four more rounds, each on fresh scenes
  for k in 5 6 7 8; do
    $TOOLVLM train detector  $R/world_detector_all_negatives.yaml \
      run_dir=runs/detector_all_negatives$k continue_from=runs/detector_all_negatives$((k - 1))/export \
      scene_offset=$(((k - 3) * 1000000)) seed=$((k - 3))
  done
  # two rounds where a quarter of the scenes are composed: any place, size and background (fourteenth bundle)
  $TOOLVLM train detector  $R/world_detector_composed.yaml \
    continue_from=runs/detector_all_negatives8/export
  $TOOLVLM train detector  $R/world_detector_composed.yaml \
    run_dir=runs/detector_composed2 continue_from=runs/detector_composed/export scene_offset=7000000 seed=7
  # the counting threshold, looking twice (the image and half a patch off) and merging the views' boxes at the
  # view IoU that counts best; grounding's threshold lower, so that position words find weak candidates too
  $TOOLVLM train calibrate-detector detector=runs/detector_composed2/export n=200 grounding_threshold=0.2 views=2 'view_iou=[0.3,0.2]'
}
stage_encoder_from_detector() {
  # the bundle's encoder: the detector's OWL-ViT weights trained contrastively again with the presence loss
  $TOOLVLM train encoder   $R/world_encoder_from_detector.yaml continue_from=runs/detector_focus/export
}
stage_captioner() {
  $TOOLVLM train captioner $R/world_captioner.yaml
  # then twice more on captions that name every colour of a group (the second time on fresh scenes)
  $TOOLVLM train captioner $R/world_captioner_colours.yaml continue_from=runs/captioner/export
  $TOOLVLM train captioner $R/world_captioner_colours.yaml run_dir=runs/captioner_colours2 \
    continue_from=runs/captioner_colours/export lr=2.0e-4 scene_offset=100000
  # then at 320 px input, its position embeddings interpolated
  $TOOLVLM train captioner $R/world_captioner_320.yaml continue_from=runs/captioner_colours2/export
}
stage_generator() {
  $TOOLVLM train generator $R/world_generator.yaml
  # then trained for classifier-free guidance (null layouts), then with small objects weighing more in the loss
  $TOOLVLM train generator $R/world_generator_guidance.yaml continue_from=runs/generator/export
  $TOOLVLM train generator $R/world_generator_objects.yaml
  # and 2000 more steps of the same on fresh scenes (the fifteenth bundle's generator), then 3000 more (the sixteenth's)
  $TOOLVLM train generator $R/world_generator_objects.yaml run_dir=runs/generator_objects2 \
    continue_from=runs/generator_objects/export scene_offset=4000000
  $TOOLVLM train generator $R/world_generator_objects.yaml run_dir=runs/generator_objects3 \
    continue_from=runs/generator_objects2/export scene_offset=5000000 steps=3000
  # and 2500 more (the seventeenth's)
  $TOOLVLM train generator $R/world_generator_objects.yaml run_dir=runs/generator_objects4 \
    continue_from=runs/generator_objects3/export scene_offset=6000000 steps=2500
}
stage_controller() {
  # the controller sees through the detector's fine-tuned vision tower (the world encoder after detection training)
  # (the bundle's controller was trained on conversations planned before build_world.planner_rng, from the random
  # stream that drew each scene; the same recipes now give conversations with other turns on the same scenes)
  $TOOLVLM train controller $R/controller_stage1.yaml model.spec.vision.checkpoint=runs/detector/export/vision
  $TOOLVLM train controller $R/controller_stage2.yaml model.base=runs/controller_stage1/model
  # more stage 2 on fresh conversations, from that adapter (the bundle's fourth controller continued the third's)
  $TOOLVLM train controller $R/controller_stage2_more.yaml model.adapter=runs/controller_stage2/adapter
  # and once more, with grounding searches that find nothing and are made again (the fifth continued the fourth's)
  $TOOLVLM train controller $R/controller_stage2_retry.yaml model.adapter=runs/controller_stage2_more/adapter
}
stage_export() {
  $TOOLVLM train export-bundle encoder=runs/encoder_from_detector detector=runs/detector_composed2 \
    captioner=runs/captioner_320 \
    generator=runs/generator_objects4 controller=runs/controller_stage2_retry
  $TOOLVLM eval world-models --json --n 30 --n-generate 30 > bundle/metrics_world.json
  $TOOLVLM eval controller --json --n 96 > bundle/metrics_controller.json
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(encoder detector encoder_from_detector controller captioner generator export)
for s in "${stages[@]}"; do
  echo "== $s"; "stage_$s"
done
