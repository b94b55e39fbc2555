"""Take docs/screenshot.png: a task with prelabel's pre-labels in the Label Studio editor.

Needs Label Studio (scripts/setup-label-studio), Debian's chromium and chromium-driver, and
selenium (`.venv/bin/pip install selenium`); Redis on 127.0.0.1:6379 (database 13 is flushed).

    .venv/bin/python scripts/screenshot.py

The task is a toy-world scene and the model the committed toy CLIP, so the pre-labels mean
something without pretrained weights.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.toyworld import COLOURS, SHAPES, render_scene  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.labelstudio import LabelStudio, Prelabel, free_port  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/13"
CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="colours" toName="image" choice="multiple" showInline="true">
    {"".join(f'<Choice value="{c}"/>' for c in COLOURS)}
  </Choices>
  <BrushLabels name="shapes" toName="image">
    {"".join(f'<Label value="{s}"/>' for s in SHAPES)}
  </BrushLabels>
</View>"""


def main() -> None:
    work = Path(tempfile.mkdtemp())
    scene = render_scene(np.random.default_rng(11), 64, max_objects=3)
    photo = work / "scene.png"
    scene.image.resize((384, 384), Image.Resampling.NEAREST).save(photo)
    redis.Redis.from_url(REDIS_URL).flushdb()
    label_studio = LabelStudio(work, free_port()).start()
    settings = Settings(
        redis_url=REDIS_URL,
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.legacy_token,
        model_checkpoint=str(REPO / "bench" / "models" / "toy-clip"),
        image_size=64,
        background_words=("grass", "sky", "sand", "water"),
        model_dir=work / "models",
        basic_auth_user="labelstudio",
        basic_auth_pass="demo-pass",
    )
    prelabel = Prelabel(settings, work)
    try:
        prelabel.wait_ready()
        project = label_studio.create_project("prelabel demo", CONFIG)
        label_studio.upload(project, photo)
        label_studio.connect_backend(project, prelabel.url, "labelstudio", "demo-pass")
        label_studio.retrieve_predictions(project)
        (task,) = label_studio.tasks(project)
        print("objects:", [(o.colour, o.shape) for o in scene.objects], "background:", scene.background)
        print("prediction:", [i["value"] for i in label_studio.predictions(task["id"])[0]["result"]])

        options = webdriver.ChromeOptions()
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,900",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
        ):
            options.add_argument(flag)
        options.binary_location = "/usr/bin/chromium"
        driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"{label_studio.url}/user/login")
            driver.find_element(By.NAME, "email").send_keys(label_studio.email)
            driver.find_element(By.NAME, "password").send_keys(label_studio.password)
            driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
            time.sleep(3)
            driver.get(f"{label_studio.url}/projects/{project}/data?task={task['id']}")
            time.sleep(12)  # the editor loads the image and draws the predicted regions
            out = REPO / "docs" / "screenshot.png"
            driver.save_screenshot(str(out))
            print("saved", out)
        finally:
            driver.quit()
    finally:
        prelabel.stop()
        label_studio.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


if __name__ == "__main__":
    main()
